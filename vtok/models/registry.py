"""Named presets, architectures, and the ``create`` / ``load`` entry points.

A preset is a full model config (architecture, encoder, quantizer); ``create(name)`` builds it with
random weights for training. ``load(dir_or_name)`` restores trained weights from a checkpoint folder or
from a pretrained model shipped inside the package.
"""

from __future__ import annotations

import copy
import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtok.errors import ConfigError

# architecture name -> "module:Class"; later families (1d, video) add a line here.
ARCHITECTURES: dict[str, str] = {
    "conv2d": "vtok.models.tokenizer:Tokenizer",
}

# Folder of pretrained checkpoints shipped with the package (one sub-folder per name).
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"

_F8 = {"channels": 128, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 2}
_F16 = {"channels": 128, "channel_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2}


@dataclass(frozen=True)
class Preset:
    """A named model configuration and the paper it follows."""

    name: str
    description: str
    config: dict[str, Any]


def _preset(name: str, description: str, encoder: dict[str, Any], quantizer: dict[str, Any]) -> Preset:
    config = {"architecture": "conv2d", "name": name, "encoder": encoder, "quantizer": quantizer}
    return Preset(name, description, config)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _preset("vqgan-f16-1k", "VQGAN (Esser et al. 2021): 256-d codes, attention at 16x16",
                {**_F16, "attn_levels": [4], "z_channels": 256},
                {"type": "vq", "dim": 256, "codebook_size": 1024, "beta": 0.25}),
        _preset("vqgan-f16-16k", "VQGAN with a 16384-entry codebook",
                {**_F16, "attn_levels": [4], "z_channels": 256},
                {"type": "vq", "dim": 256, "codebook_size": 16384, "beta": 0.25}),
        _preset("vq-f8-16k", "LlamaGen-style VQ: cosine lookup in 8-d codes, 16384 entries, f=8",
                {**_F8, "z_channels": 256},
                {"type": "vq", "dim": 256, "codebook_size": 16384, "codebook_dim": 8,
                 "distance": "cosine", "beta": 0.25}),
        _preset("vq-f16-16k", "LlamaGen VQ-16: cosine lookup in 8-d codes, 16384 entries, f=16",
                {**_F16, "z_channels": 256},
                {"type": "vq", "dim": 256, "codebook_size": 16384, "codebook_dim": 8,
                 "distance": "cosine", "beta": 0.25}),
        _preset("lfq-f16-18b", "Open-MAGVIT2-style LFQ: 18 bits, ids split into 6+12-bit sub-tokens",
                {**_F16, "mid_attention": False, "z_channels": 18},
                {"type": "lfq", "dim": 18, "sub_token_bits": [6, 12]}),
        _preset("bsq-f16-18b", "BSQ: 18 bits on the unit sphere",
                {**_F16, "mid_attention": False, "z_channels": 18},
                {"type": "bsq", "dim": 18}),
        _preset("fsq-f8-64k", "FSQ levels 8,8,8,5,5,5 (64000 implicit codes), f=8",
                {**_F8, "z_channels": 6},
                {"type": "fsq", "levels": [8, 8, 8, 5, 5, 5]}),
        _preset("ibq-f16-16k", "IBQ: index backpropagation over 16384 256-d codes",
                {**_F16, "z_channels": 256},
                {"type": "ibq", "dim": 256, "codebook_size": 16384}),
        _preset("rvq-f8-4x4k", "Residual VQ: 4 levels of 4096 codes (RQ-VAE)",
                {**_F8, "z_channels": 64},
                {"type": "residual", "num_quantizers": 4,
                 "quantizer": {"type": "vq", "dim": 64, "codebook_size": 4096}}),
        _preset("gvq-f8-4x4k", "Grouped (product) VQ: 4 groups of 16 channels, 4096 codes each",
                {**_F8, "z_channels": 64},
                {"type": "grouped", "groups": 4,
                 "quantizer": {"type": "vq", "dim": 16, "codebook_size": 4096}}),
        _preset("kl-f8-c4", "KL-VAE (LDM): continuous 4-channel latent, f=8",
                {**_F8, "z_channels": 8},
                {"type": "kl", "latent_channels": 4, "kl_weight": 1e-6}),
    ]
}


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Build a randomly initialised model of the config's architecture."""
    config = {k: v for k, v in config.items() if k not in ("format_version", "vtok_version")}
    arch = config.get("architecture", "conv2d")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    module_name, cls_name = ARCHITECTURES[arch].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls.from_config(config)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep merge; a sub-config whose ``type`` changes replaces the old one instead of merging into it
    (``quantizer: {type: fsq, levels: [...]}`` over a VQ preset must drop the VQ-only options)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        old = out.get(key)
        nested = isinstance(value, dict) and isinstance(old, dict)
        same_kind = nested and value.get("type", old.get("type")) == old.get("type")
        out[key] = _merge(old, value) if same_kind else copy.deepcopy(value)
    return out


def pretrained_names() -> list[str]:
    """Names of checkpoints shipped inside the package."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").is_file())


def _unknown(name: str) -> ConfigError:
    known = sorted(set(PRESETS) | set(pretrained_names()))
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"no model named {name!r}{hint} (`vtok models` lists all {len(known)})")


def create(name: str, seed: int | None = None, **overrides: Any) -> nn.Module:
    """A randomly initialised model from preset ``name``; nested ``overrides`` are merged into its config.

    ``seed`` makes the initialisation reproducible without touching the global RNG state.
    Example: ``vtok.create("vq-f8-16k", quantizer={"codebook_size": 4096})``.
    """
    if name not in PRESETS:
        raise _unknown(name)
    config = _merge(PRESETS[name].config, overrides)
    if seed is None:
        return model_from_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_from_config(config)


def load(name_or_path: str | Path, map_location: str = "cpu") -> nn.Module:
    """Load trained weights: a checkpoint folder, or the name of a model shipped with vtok."""
    from vtok.checkpoint import load_pretrained

    path = Path(name_or_path)
    if path.is_dir():
        return load_pretrained(path, map_location)
    name = str(name_or_path)
    if name in pretrained_names():
        return load_pretrained(PRETRAINED_DIR / name, map_location)
    if name in PRESETS:
        raise ConfigError(
            f"{name!r} is a preset without trained weights; use vtok.create({name!r}) for a randomly "
            "initialised model, or pass a checkpoint folder"
        )
    if path.suffix or "/" in name or "\\" in name:
        raise ConfigError(f"{name}: no such checkpoint folder")
    raise _unknown(name)


def resolve_model(name_or_path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, bool]:
    """For tools: load trained weights if they exist, else build the preset untrained.

    Returns ``(model, trained)`` so callers can warn that an untrained preset produces noise.
    """
    name = str(name_or_path)
    if not Path(name).is_dir() and name in PRESETS and name not in pretrained_names():
        return create(name, seed=0).to(map_location).eval(), False
    return load(name_or_path, map_location), True
