"""reir: Referring Expression Instance Retrieval platform."""

__version__ = "0.1.0"
