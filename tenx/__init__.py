"""tenx: the application layer on top of the libraries (CLI, scaffolding, demo data)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
