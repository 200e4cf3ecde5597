"""Training sets: point-in-time correct exports from the offline changelogs."""

__all__: list[str] = []
