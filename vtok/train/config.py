"""Training configuration: typed sections, shipped YAML presets, dotted overrides, strict validation.

``load_config(preset="vq-f8-tiny", overrides=["data.train=DIR", "trainer.steps=2000"])`` starts from
the defaults below, applies the preset (``vtok/train/presets/NAME.yaml``) or a user YAML file, then the
overrides (values parsed as YAML, so ``optim.betas=[0.5,0.9]`` and ``data.val=null`` work). Unknown keys,
wrong types and out-of-range values fail at once with one line naming the key — never mid-run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from vtok.atomic import atomic_write_text
from vtok.data.loader import DataConfig
from vtok.errors import ConfigError
from vtok.models.registry import PRESETS, _merge, model_from_config


@dataclass
class ModelSection:
    """A model preset name and a config merged over it (or a full config when ``preset`` is null)."""

    preset: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimSection:
    """AdamW with linear warm-up and cosine decay to ``lr * min_lr_ratio``."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    accumulate: int = 1


@dataclass
class LossSection:
    """Weights of the reconstruction, perceptual and Gram terms, and the quantizer-term schedule."""

    l1: float = 1.0
    l2: float = 0.0
    perceptual: float = 0.0
    perceptual_net: str = "vgg"
    gram: float = 0.0
    quantizer: float = 1.0
    entropy_warmup_steps: int = 0
    entropy_anneal_steps: int = 0
    entropy_final_scale: float = 1.0


@dataclass
class GANSection:
    """PatchGAN discriminator; ``weight = 0`` turns it off entirely."""

    weight: float = 0.0
    start_step: int = 0
    warmup_steps: int = 0
    loss: str = "hinge"
    adaptive: bool = True
    adaptive_max: float = 1.0e4
    lecam: float = 0.0
    lecam_decay: float = 0.999
    lr: float = 1e-4
    channels: int = 64
    layers: int = 3


@dataclass
class TrainerSection:
    """Run length, logging, validation, checkpoint cadence, EMA, device and precision."""

    steps: int = 1000
    log_every: int = 10
    val_every: int = 200
    ckpt_every: int = 200
    keep_last: int = 3
    ema_decay: float = 0.999
    max_bad_steps: int = 5
    device: str = "auto"
    amp: str = "auto"
    usage_warn: float = 0.05
    progress: bool = True


@dataclass
class TrainConfig:
    """The whole run; saved as ``config.yaml`` in the run folder and inside every checkpoint."""

    seed: int = 0
    run_dir: str = "runs/{preset}"
    preset: str | None = None  # which training preset this came from (informational, fills {preset})
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    gan: GANSection = field(default_factory=GANSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)


CHOICES: dict[str, tuple[str, ...]] = {
    "loss.perceptual_net": ("vgg", "alex"),
    "gan.loss": ("hinge", "non_saturating"),
    "trainer.amp": ("auto", "bf16", "off"),
}
# key -> (low, high, inclusive high); None bounds are open
RANGES: dict[str, tuple[float | None, float | None]] = {
    "optim.lr": (0.0, None), "optim.weight_decay": (0.0, None), "optim.warmup_steps": (0, None),
    "optim.min_lr_ratio": (0.0, 1.0), "optim.grad_clip": (0.0, None), "optim.accumulate": (1, None),
    "loss.l1": (0.0, None), "loss.l2": (0.0, None), "loss.perceptual": (0.0, None), "loss.gram": (0.0, None),
    "loss.quantizer": (0.0, None), "loss.entropy_warmup_steps": (0, None), "loss.entropy_anneal_steps": (0, None),
    "gan.weight": (0.0, None), "gan.start_step": (0, None), "gan.warmup_steps": (0, None),
    "gan.adaptive_max": (0.0, None), "gan.lecam": (0.0, None), "gan.lecam_decay": (0.0, 0.999999),
    "gan.lr": (0.0, None), "gan.channels": (1, None), "gan.layers": (1, 6),
    "trainer.steps": (1, None), "trainer.log_every": (1, None), "trainer.val_every": (1, None),
    "trainer.ckpt_every": (1, None), "trainer.keep_last": (1, None), "trainer.ema_decay": (0.0, 0.999999),
    "trainer.max_bad_steps": (1, None), "trainer.usage_warn": (0.0, 1.0),
}


# --- presets -------------------------------------------------------------------------------------
def _preset_files() -> dict[str, Any]:
    folder = resources.files("vtok.train") / "presets"
    return {p.name[:-5]: p for p in folder.iterdir() if p.name.endswith(".yaml")}


def list_presets() -> list[str]:
    """Names of the training presets shipped with vtok."""
    return sorted(_preset_files())


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections at the top level")
    return data


# --- validation ----------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints pass for floats; bools only for bools)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _hint(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(sorted(candidates))}"


def _apply(obj: Any, data: dict[str, Any], prefix: str, where: str) -> None:
    """Set the fields of dataclass ``obj`` from ``data``, recursing into sections."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in fields(obj)]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{dotted}'{_hint(dotted, [prefix + n for n in names])}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{dotted}' is a section; give it a mapping, got {value!r}")
            _apply(current, value, dotted + ".", where)
        elif key == "config" and isinstance(current, dict) and isinstance(value, dict):
            setattr(obj, key, _merge(current, value))  # model.config merges, so presets and files compose
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}: {dotted}"))


def _check(cfg: TrainConfig) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    for key, (low, high) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"{key} must be {bounds}, got {value}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas}")
    dataclasses.replace(cfg.data)  # re-runs the data section's own checks after the overrides
    if cfg.model.preset is not None and cfg.model.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown model preset {cfg.model.preset!r}"
                          f"{_hint(cfg.model.preset, list(PRESETS))}")
    try:
        with torch.device("meta"):  # builds the model without allocating weights: bad options fail now
            model_from_config(resolved_model_config(cfg))
    except ConfigError as e:
        raise ConfigError(f"model: {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"model: the model config does not build ({type(e).__name__}: {e})") from None


def resolved_model_config(cfg: TrainConfig) -> dict[str, Any]:
    """The model preset's config deep-merged with ``model.config``: what the trainer builds."""
    base = PRESETS[cfg.model.preset].config if cfg.model.preset else {}
    merged = _merge(base, cfg.model.config)
    if "quantizer" not in merged:
        raise ConfigError("model: give model.preset or a model.config with encoder and quantizer sections")
    return merged


# --- entry points --------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=VALUE"`` → (``["a", "b", "c"]``, VALUE parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(
    preset: str | None = None, file: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> TrainConfig:
    """Defaults ← preset or YAML file ← dotted overrides, validated; ``{preset}`` in run_dir filled in."""
    cfg = TrainConfig()
    if preset is not None:
        files = _preset_files()
        if preset not in files:
            raise ConfigError(f"unknown training preset {preset!r}{_hint(preset, list(files))}")
        _apply(cfg, _read_yaml(files[preset].read_text(encoding="utf-8"), f"preset {preset}"), "", f"preset {preset}")
        cfg.preset = preset
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        _apply(cfg, _read_yaml(path.read_text(encoding="utf-8"), str(path)), "", str(path))
        cfg.preset = cfg.preset or path.stem
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for part in reversed(keys):
            nested = {part: nested}
        _apply(cfg, nested, "", "override")
    cfg.run_dir = cfg.run_dir.replace("{preset}", cfg.preset or "run")
    _check(cfg)
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Inverse of :func:`to_dict`, validated (used for configs saved in checkpoints)."""
    cfg = TrainConfig()
    _apply(cfg, data, "", "saved config")
    _check(cfg)
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
