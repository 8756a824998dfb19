"""``save_pretrained`` / ``load_pretrained``: ``config.json`` + ``model.safetensors``, never pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vtok.atomic import atomic_path, atomic_write_text
from vtok.errors import CheckpointError, ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's config and weights into ``directory``; each file is written atomically."""
    from vtok import __version__

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, "vtok_version": __version__, **model.get_config()}  # type: ignore[operator]
    # clone() breaks storage sharing (tied weights), which safetensors refuses to serialise
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "vtok_version": __version__})
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return out


def read_config(directory: str | Path) -> dict[str, Any]:
    """Parse ``config.json`` in ``directory`` with errors that name the file."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a vtok checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def _mismatch_report(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(found[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k].shape) != tuple(expected[k].shape)
    ]

    def head(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {head(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {head(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {head(shapes)}")
    return "; ".join(parts)


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from its config alone, then load and verify its weights."""
    from vtok.models.registry import model_from_config

    directory = Path(directory)
    config = read_config(directory)
    try:
        model = model_from_config(config)
    except ConfigError as e:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {e}") from None
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    expected = model.state_dict()
    report = _mismatch_report(expected, state)
    if report:
        raise CheckpointError(f"{weights} does not match {CONFIG_NAME}: {report}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()
