"""Crops and flips for training images, each driven by an explicit ``numpy.random.Generator``.

No function here touches a global RNG: a sample's transform is a pure function of the image and the
generator it is handed, so the loader can rebuild the exact crop of any sample from ``(seed, position)``
alone (what makes a resumed run see the same pixels as an uninterrupted one).

Images are ``(3, H, W)`` tensors, either uint8 (0..255) or float in [0, 1]; every output is float32 in
[0, 1]. Cropping happens before the dtype conversion and the resize, so a small crop of a large photo
costs only the crop. Resizing is bicubic with antialiasing (torch's ``antialias=True``, which matches
Pillow's filter), clamped back to [0, 1] because bicubic overshoots at edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.errors import ConfigError

CROPS: tuple[str, ...] = ("random_resized", "random", "center")
# Aspect-ratio range of random-resized crops (Inception-style crops, Szegedy et al. 2015).
ASPECT_RANGE: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

Box = tuple[int, int, int, int]  # (top, left, height, width)


def to_float(image: Tensor) -> Tensor:
    """uint8 → float32 / 255; float stays (as float32)."""
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    return image.float()


def resize(image: Tensor, height: int, width: int) -> Tensor:
    """Bicubic, antialiased resize of a ``(3, H, W)`` image to float32 ``(3, height, width)`` in [0, 1]."""
    x = to_float(image)
    if x.shape[-2:] == (height, width):
        return x.contiguous()
    out = F.interpolate(x[None], size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp_(0.0, 1.0)


def crop(image: Tensor, box: Box) -> Tensor:
    """The ``(top, left, height, width)`` window of ``image`` (a view, no copy)."""
    top, left, h, w = box
    return image[:, top : top + h, left : left + w]


# --- crop boxes (pure geometry, testable without pixels) -----------------------------------------
def random_resized_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = ASPECT_RANGE,
    attempts: int = 10,
) -> Box:
    """A window covering a random fraction ``scale`` of the image area with aspect ratio (w/h) in ``ratio``.

    The aspect ratio is drawn log-uniformly so that 3:4 and 4:3 are equally likely. A draw that does not
    fit inside the image is redrawn, up to ``attempts`` times; after that the largest centred window
    whose aspect lies in ``ratio`` is used (so very elongated images still give a valid crop).
    """
    area = float(height * width)
    low, high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(low, high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, min(height, round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = min(width, round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_box(height: int, width: int) -> Box:
    """The largest centred square."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


# --- the transforms ------------------------------------------------------------------------------
def random_resized_crop(
    image: Tensor,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = ASPECT_RANGE,
) -> Tensor:
    """Crop a random window (area fraction in ``scale``, aspect in ``ratio``) and resize it to ``size``².

    The window's aspect ratio is squeezed to square by the resize, a mild distortion that is part of the
    augmentation (Inception / ImageNet training).
    """
    box = random_resized_box(image.shape[-2], image.shape[-1], rng, scale, ratio)
    return resize(crop(image, box), size, size)


def random_crop(image: Tensor, size: int, rng: np.random.Generator) -> Tensor:
    """A ``size``² window at a random position, at the image's own scale.

    An image whose short side is below ``size`` is first resized up (aspect kept) so its short side is
    exactly ``size``; it is never padded, because padding would teach the model borders that real
    images do not have.
    """
    h, w = image.shape[-2], image.shape[-1]
    if min(h, w) < size:
        factor = size / min(h, w)
        h, w = max(size, round(h * factor)), max(size, round(w * factor))
        image = resize(image, h, w)
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return to_float(crop(image, (top, left, size, size))).contiguous()


def center_crop(image: Tensor, size: int) -> Tensor:
    """The largest centred square, resized to ``size``².

    Same picture as "resize the short side to ``size``, then cut the centre", but only the kept square is
    resampled.
    """
    return resize(crop(image, center_box(image.shape[-2], image.shape[-1])), size, size)


def hflip(image: Tensor, rng: np.random.Generator, p: float = 0.5) -> Tensor:
    """Mirror left-right with probability ``p``; always draws exactly one number from ``rng``."""
    return image.flip(-1) if rng.random() < p else image


@dataclass(frozen=True)
class TrainTransform:
    """The training augmentation named by the ``data:`` config: one crop, then an optional flip.

    Called as ``transform(image, rng)``; the crop draws from ``rng`` first and the flip after, so turning
    ``hflip`` on or off never changes which window is cut.
    """

    size: int
    crop: str = "random_resized"
    min_scale: float = 0.35
    max_scale: float = 1.0
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ConfigError(f"data.crop: {self.crop!r} is not one of {', '.join(CROPS)}")
        if self.size < 1:
            raise ConfigError(f"data.size: must be a positive number of pixels, got {self.size}")
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise ConfigError(
                "data.min_scale/max_scale: need 0 < min_scale <= max_scale <= 1, "
                f"got {self.min_scale} and {self.max_scale}"
            )

    def __call__(self, image: Tensor, rng: np.random.Generator) -> Tensor:
        if self.crop == "random_resized":
            out = random_resized_crop(image, self.size, rng, (self.min_scale, self.max_scale))
        elif self.crop == "random":
            out = random_crop(image, self.size, rng)
        else:
            out = center_crop(image, self.size)
        if self.hflip:
            out = hflip(out, rng)
        return out
