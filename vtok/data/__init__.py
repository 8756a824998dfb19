"""Data in and out of vtok: image files (and, later, folders, shards and built-in datasets)."""

from vtok.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    SAMPLES,
    expand_inputs,
    load_image,
    sample_path,
    save_image,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "SAMPLES",
    "expand_inputs",
    "load_image",
    "sample_path",
    "save_image",
]
