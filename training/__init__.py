"""Training sets: point-in-time correct exports from the offline changelogs."""

from training.errors import LabelError
from training.export import ExportSummary, export_training_set, parse_features, read_labels

__all__ = ["ExportSummary", "LabelError", "export_training_set", "parse_features", "read_labels"]
