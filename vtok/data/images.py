"""Read and write image files for people: every failure is one line naming the file and the reason.

``load_image`` turns any common image file into float32 RGB ``(3, H, W)`` in [0, 1] and lists what it
had to change (grayscale → RGB, alpha composited on white, 16-bit rescaled, EXIF rotation) so callers
can tell the user. Pixel counts are checked from the header before any pixel is decoded, so a
decompression bomb costs nothing. Truncated files are rejected (vtok never sets Pillow's
``LOAD_TRUNCATED_IMAGES``), because a half-grey image silently tokenized is worse than an error.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from vtok.atomic import atomic_path
from vtok.errors import InputError

# Pillow format names vtok decodes; everything else is refused before a decoder runs.
# (JPEG covers MPO, the multi-picture JPEG variant cameras write.)
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "TIFF", "GIF")
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif"}
)
DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: well above any camera photo, far below what exhausts memory
_FORMATS_TEXT = "PNG, JPEG, WebP, BMP, TIFF, GIF"
_PILLOW_LOCK = threading.Lock()

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
SAMPLE_PREFIX = "sample:"


@dataclass(frozen=True)
class Sample:
    """An image bundled with vtok (see ``vtok/assets/README.md`` for sources and licences)."""

    name: str
    file: str
    description: str

    @property
    def path(self) -> Path:
        """Location of the file inside the installed package."""
        return ASSETS_DIR / self.file


SAMPLES: dict[str, Sample] = {
    s.name: s
    for s in [
        Sample("astronaut", "astronaut.png", "portrait of astronaut Eileen Collins, 256x256 (NASA, public domain)"),
        Sample("coffee", "coffee.png", "cup of coffee on a wooden table, 240x160 (CC0)"),
        Sample("chelsea", "chelsea.png", "Chelsea the cat, fur texture, 192x128 (CC0)"),
    ]
}


def sample_path(name: str) -> Path:
    """Path of bundled sample ``name``; unknown names list the close matches."""
    if name not in SAMPLES:
        close = difflib.get_close_matches(name, list(SAMPLES), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise InputError(f"no sample image named {name!r}; {hint}available: {', '.join(SAMPLES)}")
    return SAMPLES[name].path


def sample_name(path: str | os.PathLike[str]) -> str | None:
    """``"sample:NAME"`` when ``path`` is a bundled sample, else ``None`` (for short source names)."""
    p = Path(path)
    for s in SAMPLES.values():
        if p.name == s.file and p.parent.resolve() == ASSETS_DIR:
            return SAMPLE_PREFIX + s.name
    return None


# --- listing inputs ------------------------------------------------------------------------------
def expand_inputs(paths: Iterable[str | os.PathLike[str]], errors: list[str] | None = None) -> list[Path]:
    """Files to read, in a deterministic order.

    - a file is kept whatever its extension (the user named it; reading it reports what is wrong);
    - a directory is walked recursively (symlinked folders are not followed), keeping files with an
      image extension (case-insensitive), sorted by path;
    - ``sample:NAME`` stands for a bundled sample image (see :data:`SAMPLES`).

    A missing path, an unreadable folder or a folder without images raises :class:`InputError`, or,
    when ``errors`` is a list, appends its one-line message there and carries on. Duplicates are
    dropped (first occurrence wins).
    """
    out: list[Path] = []
    seen: set[Path] = set()

    def problem(message: str) -> None:
        if errors is None:
            raise InputError(message)
        errors.append(message)

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)

    for raw in paths:
        text = os.fspath(raw)
        if isinstance(text, str) and text.startswith(SAMPLE_PREFIX) and not Path(text).exists():
            try:
                add(sample_path(text[len(SAMPLE_PREFIX) :]))
            except InputError as e:
                problem(str(e))
            continue
        p = Path(text)
        if p.is_dir():
            found = _walk_images(p, problem)
            if not found:
                problem(f"{p}: folder contains no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            for f in found:
                add(f)
        elif p.exists() or p.is_symlink():
            add(p)
        else:
            problem(f"{p}: no such file or directory")
    return out


def _walk_images(root: Path, problem: object) -> list[Path]:
    found: list[Path] = []

    def onerror(e: OSError) -> None:
        problem(f"{e.filename}: cannot list folder ({e.strerror})")  # type: ignore[operator]

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda q: q.as_posix())


# --- reading -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _pillow_limit(max_pixels: int | None) -> Iterator[None]:
    """Keep Pillow's own bomb check (which errors at 2x ``Image.MAX_IMAGE_PIXELS``) from firing below
    ``max_pixels``; vtok's check after the header is read is the one that decides.

    Pillow's limit is a module global, so it is only lifted (under a lock, and restored) when the
    caller asks for more than Pillow allows; its warning is silenced because vtok reports instead.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pillow = Image.MAX_IMAGE_PIXELS
        if pillow is not None and (max_pixels is None or max_pixels >= 2 * pillow):
            with _PILLOW_LOCK:
                Image.MAX_IMAGE_PIXELS = None
                try:
                    yield
                finally:
                    Image.MAX_IMAGE_PIXELS = pillow
        else:
            yield


def _formats() -> list[str]:
    """The supported formats this Pillow build can open (a build without WebP just lacks it)."""
    Image.init()
    return [f for f in SUPPORTED_FORMATS if f in Image.OPEN]


def _describe_unidentified(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
        if b"\x00" not in head:
            head.decode("utf-8")
            return f"{path}: looks like a text file, not an image (vtok reads {_FORMATS_TEXT})"
    except (OSError, UnicodeDecodeError):
        pass
    return f"{path}: not a recognised image file (vtok reads {_FORMATS_TEXT})"


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an image file")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")


def load_image(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[Tensor, list[str]]:
    """Read an image file as float32 RGB ``(3, H, W)`` in [0, 1], plus notes on every conversion made.

    Grayscale, palette and CMYK images become RGB; transparency is composited onto white (what the
    image looks like on a page; dropping alpha would expose arbitrary colours under transparent
    pixels); 16-bit grayscale is scaled by 1/65535 (not clipped at 255); EXIF orientation is applied;
    of a multi-frame file the first frame is used. ``max_pixels`` (``None``: no limit) is checked from
    the header before decoding. Any failure raises :class:`InputError` naming the file.
    """
    path = Path(path)
    _check_file(path)
    notes: list[str] = []
    try:
        with _pillow_limit(max_pixels), Image.open(path, formats=_formats()) as img:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise InputError(f"{path}: image has zero size ({w}x{h})")
            if max_pixels is not None and w * h > max_pixels:
                raise InputError(
                    f"{path}: {w}x{h} is {w * h / 1e6:.1f} MP, over the {max_pixels / 1e6:g} MP limit "
                    "(a decompression-bomb guard; raise max_pixels / --max-pixels to allow it)"
                )
            frames = int(getattr(img, "n_frames", 1) or 1)
            if frames > 1:
                notes.append(f"used the first of {frames} frames")
            rawmode = _rawmode(img)
            img.load()  # decode everything now: truncated data raises here
            img = _apply_exif(img, notes)
            array = _to_rgb_array(img, rawmode, notes)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: image too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise InputError(_describe_unidentified(path)) from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except MemoryError:
        raise InputError(f"{path}: not enough memory to decode this image") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as e:
        reason = str(e).strip() or type(e).__name__
        raise InputError(f"{path}: cannot decode image ({reason}); the file may be truncated or corrupt") from None
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))
    return tensor, notes


def _rawmode(img: Image.Image) -> str:
    """How the pixels are stored on disk (e.g. ``RGB;16B``), readable before decoding."""
    try:
        args = img.tile[0][3] if img.tile else None
    except (AttributeError, IndexError, TypeError):
        return ""
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return ""


def _apply_exif(img: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is not a reason to refuse the pixels
        notes.append("ignored unreadable EXIF data")
        return img
    if orientation in (1,) or not 2 <= orientation <= 8:
        return img
    out = ImageOps.exif_transpose(img)
    notes.append(f"applied EXIF orientation {orientation} ({_ORIENTATIONS[orientation]})")
    return out if out is not None else img


_ORIENTATIONS = {
    2: "mirrored",
    3: "rotated 180°",
    4: "flipped vertically",
    5: "transposed",
    6: "rotated 90° clockwise",
    7: "transversed",
    8: "rotated 90° counter-clockwise",
}

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "I;16LS")


def _to_rgb_array(img: Image.Image, rawmode: str, notes: list[str]) -> np.ndarray:
    """Float32 ``(H, W, 3)`` in [0, 1] from any Pillow mode, noting each conversion."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        gray = np.asarray(img).astype(np.float32) / 65535.0
        notes.append("converted 16-bit grayscale to RGB (scaled by 1/65535)")
        return _gray_to_rgb(np.clip(gray, 0.0, 1.0))
    if mode == "I":
        values = np.asarray(img).astype(np.float64)
        notes.append("converted 32-bit integer grayscale to RGB (read as 16-bit: scaled by 1/65535)")
        if values.size and (values.min() < 0 or values.max() > 65535):
            notes.append("clipped values outside 0..65535")
        return _gray_to_rgb(np.clip(values / 65535.0, 0.0, 1.0).astype(np.float32))
    if mode == "F":
        values = np.asarray(img).astype(np.float32)
        notes.append("converted 32-bit float grayscale to RGB (values taken as [0, 1])")
        if values.size and (not np.isfinite(values).all() or values.min() < 0 or values.max() > 1):
            notes.append("clipped values outside [0, 1] (and replaced NaN/inf)")
            values = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0)
        return _gray_to_rgb(np.clip(values, 0.0, 1.0))
    if mode == "1":
        notes.append("converted 1-bit black-and-white to RGB")
        return _gray_to_rgb(np.asarray(img.convert("L")).astype(np.float32) / 255.0)
    if mode == "L":
        notes.append("converted grayscale to RGB")
        return _gray_to_rgb(np.asarray(img).astype(np.float32) / 255.0)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        notes.append("converted palette image to RGB")
    elif mode in ("LA", "La"):
        img = img.convert("RGBA")
        notes.append("converted grayscale to RGB")
    elif mode in ("RGBa", "RGBX"):
        img = img.convert("RGBA" if mode == "RGBa" else "RGB")
    elif mode not in ("RGB", "RGBA"):
        try:
            img = img.convert("RGB")
        except ValueError:
            raise ValueError(f"unsupported pixel mode {mode}") from None
        notes.append(f"converted {mode} to RGB")
    if ";16" in rawmode and img.mode in ("RGB", "RGBA"):
        notes.append("reduced 16-bit colour to 8 bits per channel (Pillow has no 16-bit RGB mode)")
    pixels = np.asarray(img).astype(np.float32) / 255.0
    if img.mode == "RGBA":
        rgb, alpha = pixels[..., :3], pixels[..., 3:]
        if float(alpha.min()) < 1.0:
            notes.append("composited transparent pixels onto a white background")
        return rgb * alpha + (1.0 - alpha)
    return pixels


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


# --- writing -------------------------------------------------------------------------------------
def to_uint8(image: Tensor) -> Tensor:
    """Float in [0, 1] → uint8 by clamping and rounding to nearest (what a PNG of it would hold)."""
    return torch.nan_to_num(image.detach().float(), nan=0.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def save_image(image: Tensor, path: str | os.PathLike[str]) -> Path:
    """Write ``(3, H, W)`` / ``(1, 3, H, W)`` / ``(H, W)`` floats in [0, 1] as an 8-bit PNG, atomically."""
    x = image.detach().cpu()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise InputError(f"save_image expects (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
    pixels = to_uint8(x).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    target = Path(path)
    with atomic_path(target) as tmp:
        picture.save(tmp, format="PNG")
    return target
