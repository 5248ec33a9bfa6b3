"""A precomputed-feature pipeline for training and serving image-captioning models."""

__version__ = "0.1.0"
