"""The ``vtok`` command: encode images to a token file, decode it back, reconstruct one image, list models.

Errors meant for people (:class:`vtok.errors.VtokError`) are printed as one ``vtok: error: ...`` line;
any other exception is a bug and keeps its traceback. Exit codes: 0 success, 1 some inputs skipped
(the others were processed and written), 2 error or usage error (nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from vtok.data.images import (
    DEFAULT_MAX_PIXELS,
    SAMPLE_PREFIX,
    SAMPLES,
    expand_inputs,
    load_image,
    sample_name,
    save_image,
)
from vtok.errors import ConfigError, InputError, VtokError
from vtok.metrics import psnr
from vtok.tokenfile import config_hash, load_tokens, save_tokens

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

T = TypeVar("T")

_EXIT_CODES = (
    "Exit status: 0 success; 1 some inputs were skipped (the rest were written); 2 error, nothing written; "
    "130 interrupted (Ctrl-C)."
)

_SAMPLE_HELP = (
    f"An image path may also be {SAMPLE_PREFIX}NAME for an image bundled with vtok "
    f"({', '.join(SAMPLE_PREFIX + n for n in SAMPLES)})."
)


class Console:
    """Where messages go: results on stdout, notes/warnings/progress on stderr (notes off with -q)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def out(self, message: str) -> None:
        print(message, file=sys.stdout, flush=True)

    def note(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(f"vtok: {message}", file=sys.stderr)

    def warn(self, message: str) -> None:
        tqdm.write(f"vtok: warning: {message}", file=sys.stderr)

    def progress(self, items: Sequence[T], desc: str) -> Iterator[T]:
        """A tqdm bar on stderr for more than one item, only when stderr is a terminal."""
        disable = self.quiet or len(items) < 2 or not _isatty(sys.stderr)
        yield from tqdm(items, desc=desc, unit="img", file=sys.stderr, disable=disable, leave=False)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --- argument types ------------------------------------------------------------------------------
def _pixel_count(text: str) -> int | None:
    """``--max-pixels``: an integer, optionally with K/M/G (powers of 1000), or ``none`` for no limit."""
    t = text.strip().lower().replace("_", "")
    if t in ("none", "off", "inf"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)", t)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pixel count (e.g. 64M, 1000000, none)")
    value = int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2)])
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive (or 'none' for no limit)")
    return value


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device name (try cpu, cuda or cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


# --- models --------------------------------------------------------------------------------------
def _load_model(spec: str | None, device: torch.device, console: Console) -> tuple[nn.Module, str, bool]:
    """``(model, the name it was asked for, whether it has trained weights)``; warns when it has not."""
    from vtok.models.registry import pretrained_names, resolve_model

    if spec is None:
        if "default" not in pretrained_names():
            raise ConfigError(
                "no model given and no pretrained 'default' model is installed; pass -m with a checkpoint "
                "folder or a model name (`vtok models` lists them)"
            )
        spec = "default"
    model, trained = resolve_model(spec, map_location=str(device))
    if not trained:
        console.warn(
            f"{spec!r} is an untrained preset with random weights: its tokens and images are noise. "
            "Pass a trained checkpoint folder with -m for real output."
        )
    return model.eval(), spec, trained


def _check_output_file(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; -o needs a file name")


def _written(path: Path, write: Any) -> Any:
    """Run a write, turning file-system failures into one-line errors that name the output."""
    try:
        return write()
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror or e})") from None


def _source_label(path: Path) -> str:
    return sample_name(path) or str(path)


# --- encode --------------------------------------------------------------------------------------
def cmd_encode(args: argparse.Namespace, console: Console) -> int:
    """Encode images (files, folders, samples) into one token file; bad files are skipped and listed."""
    device = _device(args.device)
    output = Path(args.output)
    _check_output_file(output)
    model, model_id, _ = _load_model(args.model, device, console)
    problems: list[str] = []
    files = expand_inputs(args.images, errors=problems)
    items, sources = [], []
    for path in console.progress(files, "encode"):
        label = _source_label(path)
        try:
            image, notes = load_image(path, max_pixels=args.max_pixels)
            for n in notes:
                console.note(f"{label}: {n}")
            with torch.inference_mode():
                tokens = model.encode(image[None].to(device))
            items.append(tokens.to("cpu"))
            sources.append(label)
        except VtokError as e:
            problems.append(_one_line(e))
        except (torch.OutOfMemoryError, MemoryError):
            problems.append(f"{label}: out of memory while encoding; try a smaller image or another --device")
    if items:
        info = model.info
        _written(output, lambda: save_tokens(output, items, sources, info=info, model_id=model_id,
                                             model_config_hash=config_hash(model.get_config())))
        grids = sorted({"x".join(map(str, t.grid)) for t in items})
        shown = ", ".join(grids[:5]) + (f" and {len(grids) - 5} more" if len(grids) > 5 else "")
        console.out(f"wrote {len(items)} image(s) to {output} (token grids {shown})")
    return _finish(problems, done=len(items), nothing="no image could be encoded; nothing written")


def _finish(problems: list[str], done: int, nothing: str) -> int:
    if problems:
        print(f"vtok: skipped {len(problems)} file(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
    if not done:
        print(f"vtok: error: {nothing}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_PARTIAL if problems else EXIT_OK


# --- decode --------------------------------------------------------------------------------------
def _safe_stem(source: str, index: int) -> str:
    name = source[len(SAMPLE_PREFIX):] if source.startswith(SAMPLE_PREFIX) else Path(source.replace("\\", "/")).stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return name or f"item{index}"


def output_names(sources: Sequence[str]) -> list[str]:
    """One ``.png`` name per source, from its stem; clashes (case-insensitive) get ``-2``, ``-3``, ..."""
    used: set[str] = set()
    names = []
    for i, source in enumerate(sources):
        stem = _safe_stem(source, i)
        candidate, k = stem, 2
        while candidate.lower() in used:
            candidate, k = f"{stem}-{k}", k + 1
        used.add(candidate.lower())
        names.append(candidate + ".png")
    return names


def cmd_decode(args: argparse.Namespace, console: Console) -> int:
    """Decode every item of a token file to a PNG in the output folder."""
    device = _device(args.device)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a folder; -o names the output folder for decode")
    model, model_id, _ = _load_model(args.model, device, console)
    token_file = load_tokens(args.tokens, info=model.info)
    here = config_hash(model.get_config())
    if token_file.config_hash and token_file.config_hash != here:
        console.warn(
            f"{args.tokens} was written by model {token_file.model!r} (config {token_file.config_hash}); decoding "
            f"with {model_id!r} (config {here}) gives wrong images unless the two share their codebook"
        )
    _written(out_dir, lambda: out_dir.mkdir(parents=True, exist_ok=True))
    names = output_names(token_file.sources)
    for tokens, name in console.progress(list(zip(token_file.items, names, strict=True)), "decode"):
        with torch.inference_mode():
            image = model.decode(tokens.to(device))
        _written(out_dir / name, lambda image=image, name=name: save_image(image[0], out_dir / name))
    console.out(f"wrote {len(names)} image(s) to {out_dir}")
    return EXIT_OK


# --- reconstruct ---------------------------------------------------------------------------------
def psnr_8bit(original: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """PSNR in dB of one ``(C, H, W)`` pair on 8-bit values, data range 1 (:func:`vtok.metrics.psnr`)."""
    return float(psnr(reconstruction[None], original[None])[0])


def cmd_reconstruct(args: argparse.Namespace, console: Console) -> int:
    """Encode and decode one image; print PSNR, grid and bit rate; write original | reconstruction."""
    device = _device(args.device)
    output = Path(args.output) if args.output else None
    if output is not None:
        _check_output_file(output)
    if args.image is None and args.sample is None:
        raise ConfigError("reconstruct needs an IMAGE or --sample NAME")
    if args.image is not None and args.sample is not None:
        raise ConfigError("reconstruct takes an IMAGE or --sample NAME, not both")
    model, model_id, trained = _load_model(args.model, device, console)
    files = expand_inputs([args.image if args.sample is None else SAMPLE_PREFIX + args.sample])
    if len(files) != 1:
        raise ConfigError(f"{args.image}: reconstruct takes one image; for folders use `vtok encode` and `vtok decode`")
    path = files[0]
    label = _source_label(path)
    image, notes = load_image(path, max_pixels=args.max_pixels)
    for n in notes:
        console.note(f"{label}: {n}")
    with torch.inference_mode():
        tokens = model.encode(image[None].to(device))
        recon = model.decode(tokens)[0].float().cpu()
    info = model.info
    h, w = image.shape[-2:]
    grid = "x".join(map(str, tokens.grid))
    positions = math.prod(tokens.grid)
    console.out(f"image:  {label} ({w}x{h})")
    untrained = "" if trained else ", untrained: random weights"
    console.out(f"model:  {model_id} ({_family(model.get_config())}, f={_factor(info.downsample)}{untrained})")
    if info.continuous:
        console.out(f"tokens: {grid} grid of {info.latent_channels}-channel continuous latents")
    else:
        per = f", {info.num_codebooks} ids each" if info.num_codebooks > 1 else ""
        console.out(
            f"tokens: {grid} grid ({positions} positions{per}), {info.bits_per_token:.4g} bits/token, "
            f"{info.bits_per_pixel((int(h), int(w))):.4g} bits/pixel"
        )
    console.out(f"PSNR:   {psnr_8bit(image, recon):.2f} dB (8-bit RGB, data range 1)")
    if output is not None:
        side = torch.cat([image, recon], dim=-1)
        _written(output, lambda: save_image(side, output))
        console.out(f"wrote:  {output} (original | reconstruction)")
    return EXIT_OK


# --- models --------------------------------------------------------------------------------------
def _family(config: dict[str, Any]) -> str:
    q = config.get("quantizer") or {}
    name = str(q.get("type", "?"))
    inner = q.get("quantizer")
    return f"{name}({inner.get('type', '?')})" if isinstance(inner, dict) else name


def _factor(downsample: Iterable[int]) -> str:
    ds = list(downsample)
    return str(ds[0]) if len(set(ds)) == 1 else "x".join(map(str, ds))


def _vocab(info: Any) -> str:
    if info.continuous:
        return f"continuous ({info.latent_channels} ch)"
    subs = list(info.sub_vocab_sizes) or [info.codebook_size] * info.num_codebooks
    if len(subs) == 1:
        return str(subs[0])
    if len(set(subs)) == 1:
        return f"{len(subs)}x{subs[0]}"
    return "+".join(map(str, subs))


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def describe_config(config: dict[str, Any]) -> dict[str, Any]:
    """Family, factor, vocabulary, bits/token and parameter count of a config without allocating weights.

    The model is built on the ``meta`` device (shapes only); a family whose constructor needs real
    tensors falls back to an ordinary CPU build.
    """
    from vtok.models.registry import model_from_config

    try:
        with torch.device("meta"):
            model = model_from_config(config)
    except (VtokError, ImportError):
        raise
    except Exception:  # e.g. a constructor that reads tensor values, which meta tensors do not have
        model = model_from_config(config)
    info = model.info  # type: ignore[union-attr]
    return {
        "family": _family(config),
        "f": _factor(info.downsample),
        "vocab": _vocab(info),
        "bits_per_token": None if info.continuous else round(float(info.bits_per_token), 3),
        "params": sum(p.numel() for p in model.parameters()),
    }


def model_rows(console: Console | None = None) -> list[dict[str, Any]]:
    """One row per preset and per shipped pretrained model (a preset with weights is one row)."""
    from vtok.checkpoint import read_config
    from vtok.models.registry import PRESETS, PRETRAINED_DIR, pretrained_names

    shipped = pretrained_names()
    entries: list[tuple[str, dict[str, Any] | None, str, bool]] = []
    for name, preset in PRESETS.items():
        entries.append((name, preset.config, preset.description, name in shipped))
    for name in shipped:
        if name in PRESETS:
            continue
        readme = PRETRAINED_DIR / name / "README.md"
        description = ""
        if readme.is_file():
            lines = [ln.strip("# ").strip() for ln in readme.read_text(encoding="utf-8").splitlines() if ln.strip()]
            description = lines[0] if lines else ""
        try:
            config: dict[str, Any] | None = read_config(PRETRAINED_DIR / name)
        except VtokError as e:
            if console:
                console.warn(_one_line(e))
            config = None
        entries.append((name, config, description or "pretrained", True))
    rows = []
    for name, config, description, trained in entries:
        row: dict[str, Any] = {"name": name, "family": _family(config or {}), "f": "?", "vocab": "?",
                               "bits_per_token": None, "params": None}
        if config is not None:
            try:
                row.update(describe_config(config))
            except Exception as e:  # one broken family must not hide the others
                if console:
                    console.warn(f"{name}: cannot build ({type(e).__name__}: {_one_line(e)})")
        row.update({"trained": trained, "description": description})
        rows.append(row)
    return rows


def cmd_models(args: argparse.Namespace, console: Console) -> int:
    """Print presets and shipped pretrained models as a table (or JSON)."""
    rows = model_rows(console)
    if args.json:
        console.out(json.dumps(rows, indent=2))
        return EXIT_OK
    header = ["name", "family", "f", "vocab", "bits/token", "params", "trained", "description"]
    table = [
        [
            r["name"], r["family"], r["f"], r["vocab"],
            "-" if r["bits_per_token"] is None else f"{r['bits_per_token']:.4g}",
            "?" if r["params"] is None else _human(r["params"]),
            "yes" if r["trained"] else "no",
            r["description"],
        ]
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header) - 1)]
    right = {2, 4, 5}
    for row in [header, *table]:
        cells = [str(c).rjust(wd) if i in right else str(c).ljust(wd)
                 for i, (c, wd) in enumerate(zip(row[:-1], widths, strict=True))]
        console.out("  ".join([*cells, str(row[-1])]).rstrip())
    untrained = sum(not r["trained"] for r in rows)
    if untrained:
        console.out(f"\n{untrained} model(s) have no trained weights: `-m NAME` builds them with random weights "
                    "(noise); train one or pass a checkpoint folder.")
    return EXIT_OK


# --- train ---------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace, console: Console) -> int:
    """Train a tokenizer from a preset or YAML file plus dotted overrides; resumable."""
    from vtok.train.config import load_config
    from vtok.train.loop import train

    if args.preset is None and args.config is None:
        from vtok.train.config import list_presets

        raise ConfigError(f"pass --preset NAME or --config FILE; presets: {', '.join(list_presets())}")
    cfg = load_config(preset=args.preset, file=args.config, overrides=args.overrides)
    if args.quiet:
        cfg.trainer.progress = False
    result = train(cfg, resume=args.resume)
    console.out(f"exported model: {result.export}")
    return EXIT_OK


# --- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for ``vtok`` and its subcommands."""
    from vtok import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no notes on stderr")
    with_model = argparse.ArgumentParser(add_help=False)
    with_model.add_argument(
        "-m", "--model", default=None, metavar="MODEL",
        help="checkpoint folder, name of a shipped pretrained model, or preset name (a preset without weights "
             "is built untrained: output is noise). Default: the shipped 'default' model, if installed.",
    )
    with_model.add_argument("--device", default="auto",
                            help="cpu, cuda, cuda:N, mps, or auto (CUDA when available; the default)")
    pixels = argparse.ArgumentParser(add_help=False)
    pixels.add_argument(
        "--max-pixels", type=_pixel_count, default=DEFAULT_MAX_PIXELS, metavar="N",
        help=f"refuse images with more than N pixels before decoding them (default {DEFAULT_MAX_PIXELS // 10**6}M; "
             "accepts K/M/G suffixes, or 'none')",
    )
    parser = argparse.ArgumentParser(
        prog="vtok", description="Visual tokenizers: images to tokens and back.", epilog=_EXIT_CODES,
    )
    parser.add_argument("--version", action="version", version=f"vtok {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "encode", parents=[common, with_model, pixels], help="images -> one token file",
        description="Encode images (files or folders, searched recursively) into one safetensors token file. "
                    f"Unreadable files are skipped and listed at the end. {_SAMPLE_HELP}",
        epilog=_EXIT_CODES,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file, folder, or sample:NAME")
    p.add_argument("-o", "--output", required=True, metavar="TOKENS", help="token file to write (.safetensors)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser(
        "decode", parents=[common, with_model], help="token file -> one PNG per image",
        description="Decode every image in a token file to OUTDIR/<source name>.png (clashing names get -2, -3).",
        epilog=_EXIT_CODES,
    )
    p.add_argument("tokens", metavar="TOKENS", help="token file written by `vtok encode`")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the decoded PNGs")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser(
        "reconstruct", parents=[common, with_model, pixels], help="encode + decode one image, print PSNR",
        description="Encode and decode one image; print the token grid, bits per token and per pixel, and the "
                    "PSNR of the 8-bit images; with -o write original | reconstruction side by side. "
                    f"{_SAMPLE_HELP} Example: vtok reconstruct --sample astronaut -m MODEL -o out.png",
        epilog=_EXIT_CODES,
    )
    p.add_argument("image", nargs="?", metavar="IMAGE", help="image file (or sample:NAME)")
    p.add_argument("--sample", metavar="NAME", choices=list(SAMPLES),
                   help=f"use a bundled sample image instead of IMAGE: {', '.join(SAMPLES)}")
    p.add_argument("-o", "--output", default=None, metavar="PNG", help="write original | reconstruction here")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser(
        "train", parents=[common], help="train a tokenizer (resumable; torchrun for several processes)",
        description="Train a tokenizer. Settings come from a shipped preset (--preset) or a YAML file (--config), "
                    "then dotted overrides such as data.train=DIR trainer.steps=2000. The run folder receives "
                    "config.yaml, metrics.jsonl, TensorBoard events, validation grids, checkpoints and the exported "
                    "EMA model. Ctrl-C or SIGTERM saves a checkpoint; running the same command again continues. "
                    "For N processes: torchrun --nproc_per_node=N -m vtok train ...",
        epilog=_EXIT_CODES,
    )
    p.add_argument("--preset", default=None, help="shipped training preset (see vtok/train/presets)")
    p.add_argument("--config", default=None, metavar="YAML", help="YAML file with the same layout as a preset")
    p.add_argument("--resume", default="auto", metavar="auto|never|CKPT",
                   help="auto: continue from the run folder's newest checkpoint (default); never: refuse a folder "
                        "with checkpoints; or a checkpoint file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=2e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("models", parents=[common], help="list presets and pretrained models",
                       description="List model presets and shipped pretrained models.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vtok`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (argparse has printed the message)
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    console = Console(quiet=getattr(args, "quiet", False))
    try:
        return int(args.func(args, console))
    except KeyboardInterrupt as e:
        print(f"\nvtok: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except VtokError as e:
        print(f"vtok: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except (torch.OutOfMemoryError, MemoryError):
        print("vtok: error: out of memory; try a smaller image or another --device", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # e.g. `vtok models | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PARTIAL


if __name__ == "__main__":
    sys.exit(main())
