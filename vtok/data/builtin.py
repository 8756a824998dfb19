"""Built-in training data that needs no download: the colour photographs shipped inside scikit-image.

``builtin:photos`` (training) and ``builtin:photos-val`` (held out) are fixed, disjoint lists of the
real colour photographs in ``skimage.data`` (all stored inside the scikit-image wheel, so nothing is
fetched). Random crops of seven photos make an endless, if small, training stream: enough for tests,
the quick start and smoke-training any preset; not enough to train a useful tokenizer.

Left out on purpose: ``cat`` (the same photo as ``chelsea``, which is held out), the synthetic
``colorwheel``/``logo``/``checkerboard``/``binary_blobs``/``shepp_logan_phantom``, the grayscale images
(``camera``, ``moon``, ``coins``, ``page``, …; the photos sources are colour only) and the images
scikit-image downloads on demand (``eagle``, ``kidney``, ``lily``, …).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vtok.errors import ConfigError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Photo:
    """One photograph from ``skimage.data``: the function that returns it and what it shows."""

    name: str
    function: str
    description: str
    index: int | None = None  # element of a tuple-returning function (the stereo pair)


PHOTOS: dict[str, Photo] = {
    p.name: p
    for p in [
        Photo("astronaut", "astronaut", "astronaut Eileen Collins, portrait, 512x512 (NASA, public domain)"),
        Photo("rocket", "rocket", "launch of a Falcon 9 carrying DSCOVR, 640x427 (SpaceX, public domain)"),
        Photo("motorcycle_left", "stereo_motorcycle", "motorcycle, left view, 741x500 (Middlebury 2014 stereo)", 0),
        Photo("motorcycle_right", "stereo_motorcycle", "motorcycle, right view, 741x500 (Middlebury 2014 stereo)", 1),
        Photo("hubble_deep_field", "hubble_deep_field", "Hubble eXtreme Deep Field, 1000x872 (NASA, public domain)"),
        Photo("immunohistochemistry", "immunohistochemistry", "IHC-stained colonic glands under a microscope, 512x512"),
        Photo("retina", "retina", "fundus photograph of a human retina, 1411x1411 (CC0)"),
        Photo("coffee", "coffee", "cup of coffee on a wooden table, 600x400 (CC0)"),
        Photo("chelsea", "chelsea", "Chelsea the cat, 451x300 (CC0)"),
    ]
}

# The held-out photos never appear in training. The stereo pair stays together on the training side:
# its two views are near-duplicates, so splitting them would leak training pixels into validation.
BUILTINS: dict[str, tuple[str, ...]] = {
    "photos": (
        "astronaut",
        "rocket",
        "motorcycle_left",
        "motorcycle_right",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
    ),
    "photos-val": ("coffee", "chelsea"),
}


def _skimage_data(field: str) -> Any:
    try:
        import skimage.data
    except ImportError:
        raise ConfigError(
            f"{field}: the built-in photos come from scikit-image, which is not installed; "
            "run: pip install 'vtok[train]'"
        ) from None
    return skimage.data


def load_photo(name: str, field: str = "data.train") -> Tensor:
    """Photo ``name`` as uint8 ``(3, H, W)``."""
    photo = PHOTOS[name]
    value = getattr(_skimage_data(field), photo.function)()
    array = value[photo.index] if photo.index is not None else value
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:  # guards a changed scikit-image
        raise ConfigError(f"{field}: skimage.data.{photo.function} is not an 8-bit RGB photo in this version")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class BuiltinPhotos:
    """A fixed list of built-in photos, loadable by index (decoded once per process, kept in memory)."""

    def __init__(self, which: str = "photos", field: str = "data.train") -> None:
        if which not in BUILTINS:
            close = difflib.get_close_matches(which, list(BUILTINS), n=2, cutoff=0.4)
            hint = f" (did you mean {', '.join(BUILTIN_PREFIX + c for c in close)}?)" if close else ""
            names = ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
            raise ConfigError(f"{field}: no built-in dataset {BUILTIN_PREFIX}{which}{hint}; available: {names}")
        _skimage_data(field)  # fail at configuration time, not in a worker
        self.which = which
        self.field = field
        self.names: tuple[str, ...] = BUILTINS[which]
        self.skipped: list[tuple[str, str]] = []
        self.found = len(self.names)
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.names)

    def name(self, index: int) -> str:
        return f"{BUILTIN_PREFIX}{self.which}/{self.names[index]}"

    def load(self, index: int) -> Tensor:
        """Photo ``index`` as uint8 ``(3, H, W)`` (shared: callers must not modify it in place)."""
        if index not in self._cache:
            self._cache[index] = load_photo(self.names[index], self.field)
        return self._cache[index]

    def describe(self) -> str:
        return f"{BUILTIN_PREFIX}{self.which} ({len(self)} photos from scikit-image)"

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes decode their own copies instead of receiving megabytes through a pipe.
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state
