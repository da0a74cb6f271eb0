"""splitfed: train PyTorch models across parties that never share raw data."""

__version__ = "0.1.0"
