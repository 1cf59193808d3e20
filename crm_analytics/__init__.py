"""Customer-analytics pipeline: shared building blocks (settings, artifact store, mapping, sample data, CLI)."""

__version__ = "0.1.0"
