"""A folder of images (searched recursively) as an indexable training source.

The folder is scanned once, when the source is built: every image file's header is read (no pixels are
decoded, so a scan of a large folder costs one small read per file, run on a few threads) and files
that cannot serve as training images are left out and listed with a reason — unreadable, empty, not
an image, over the pixel limit, or smaller than ``min_size`` on either side. Damage that only shows
when pixels are decoded (a truncated JPEG) is found later, at load time: :meth:`ImageFolder.load` then
raises :class:`~vtok.errors.InputError` and the loader substitutes another image and counts it.
Nothing in here ends a run because of one bad file.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from vtok.data.images import DEFAULT_MAX_PIXELS, SUPPORTED_FORMATS, expand_inputs, load_image
from vtok.errors import InputError


def _openable_formats() -> list[str]:
    Image.init()
    return [f for f in SUPPORTED_FORMATS if f in Image.OPEN]


def probe_image(path: Path, min_size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """Why ``path`` cannot be a training image (``"kind: detail"``), or ``None`` when its header is fine.

    Reads the header only; kinds are ``unreadable``, ``empty``, ``not an image``, ``too large`` and
    ``too small``.
    """
    try:
        if path.stat().st_size == 0:
            return "empty: 0 bytes"
        with Image.open(path, formats=_openable_formats()) as img:
            width, height = img.size
    except UnidentifiedImageError:
        return "not an image: Pillow does not recognise the contents"
    except Image.DecompressionBombError:
        return "too large: over Pillow's decompression-bomb limit"
    except PermissionError:
        return "unreadable: permission denied"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return f"unreadable: {str(e).strip() or type(e).__name__}"
    if max_pixels is not None and width * height > max_pixels:
        return f"too large: {width}x{height} is over the {max_pixels / 1e6:g} MP limit"
    if min(width, height) < min_size:
        return f"too small: {width}x{height}, data.min_size is {min_size}"
    return None


class ImageFolder:
    """Every usable image under ``root`` (recursive, sorted by path), loadable by index.

    ``skipped`` lists ``(path, reason)`` for each file left out by the scan; ``found`` counts the image
    files seen. ``field`` (e.g. ``"data.train"``) prefixes error messages so the user knows which
    setting to fix.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        min_size: int = 16,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        field: str = "data.train",
        threads: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.min_size = int(min_size)
        self.max_pixels = max_pixels
        try:
            candidates = expand_inputs([self.root])
        except InputError as e:
            raise InputError(f"{field}: {e}") from None
        workers = threads or min(16, 4 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(lambda p: probe_image(p, self.min_size, max_pixels), candidates))
        self.files: list[Path] = [p for p, r in zip(candidates, reasons, strict=True) if r is None]
        self.skipped: list[tuple[str, str]] = [
            (str(p), r) for p, r in zip(candidates, reasons, strict=True) if r is not None
        ]
        self.found = len(candidates)
        if not self.files:
            example = f" (first: {self.skipped[0][0]}: {self.skipped[0][1]})" if self.skipped else ""
            raise InputError(f"{field}: {self.root}: none of its {self.found} image files is usable{example}")

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        """The file behind ``index`` (for skip reports)."""
        return str(self.files[index])

    def load(self, index: int) -> Tensor:
        """Decode image ``index`` as float32 ``(3, H, W)`` in [0, 1]; :class:`InputError` if it cannot be used."""
        path = self.files[index]
        try:
            image, _ = load_image(path, self.max_pixels)
        except InputError as e:
            detail = str(e).removeprefix(f"{path}: ")
            raise InputError(f"unreadable: {detail}") from None
        h, w = image.shape[-2:]
        if min(h, w) < self.min_size:
            raise InputError(f"too small: {w}x{h}, data.min_size is {self.min_size}")
        return image

    def describe(self) -> str:
        """One line for logs: where, how many usable, how many left out."""
        left = f", {len(self.skipped)} skipped" if self.skipped else ""
        return f"folder {self.root} ({len(self.files)} images{left})"
