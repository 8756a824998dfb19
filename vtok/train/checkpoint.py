"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint holds the model, its EMA, the discriminator, both optimizers and schedulers, the step, the
RNG states, the data position and the resolved config. Files are ``run_dir/checkpoints/step-XXXXXXXX.pt``,
written to a temporary file and renamed, so a crash mid-write leaves the previous checkpoint intact.
They are read back with ``torch.load(weights_only=True)``: tensors and plain containers only, no code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vtok.atomic import atomic_path
from vtok.errors import CheckpointError

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Folder of a run's training checkpoints."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files from an interrupted write are ignored)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, if any."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` for ``step`` atomically, then delete all but the newest ``keep_last`` checkpoints."""
    path = checkpoint_dir(run_dir) / f"step-{step:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save({"format_version": FORMAT_VERSION, "step": step, **state}, tmp)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint without executing code; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable vtok training checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a vtok training checkpoint (format {FORMAT_VERSION} expected)")
    return state
