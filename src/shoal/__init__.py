"""shoal: train models on data that never leaves its owners."""

__version__ = "0.1.0"
