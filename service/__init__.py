"""convserve: an image-classification service for CNNs."""

__version__ = "0.1.0"
