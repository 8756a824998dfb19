"""Data in and out of vtok: image files, and training data from folders, tar shards and built-in photos."""

from vtok.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    SAMPLES,
    expand_inputs,
    load_image,
    sample_path,
    save_image,
)
from vtok.data.loader import DataConfig, DataStats, train_batches, validation_images

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "SAMPLES",
    "DataConfig",
    "DataStats",
    "expand_inputs",
    "load_image",
    "sample_path",
    "save_image",
    "train_batches",
    "validation_images",
]
