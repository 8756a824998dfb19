"""Training configuration: typed sections, shipped YAML presets, dotted overrides, strict validation.

``load_config(preset="vq-f8-tiny", overrides=["data.train=DIR", "trainer.steps=2000"])`` starts from the
defaults below, applies the preset (``vtok/train/presets/NAME.yaml``, package data) or a user YAML file (or
the preset, then the file), then the overrides. Values are read as YAML, so ``optim.betas=[0.5,0.9]`` and
``data.val=null`` work, and ``model.config.quantizer.codebook_size=4096`` reaches into the free-form model
dict. Unknown keys, wrong types, bad choices, out-of-range values and model options that do not build
all fail at load time with one line naming the key: never mid-run.

YAML is read with 1.2 scalar rules (a safe loader): only ``true``/``false`` are booleans, so
``trainer.amp=off`` is the string ``"off"`` rather than ``False``, and ``3e-4`` is a number, not a string.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from vtok.atomic import atomic_write_text
from vtok.data.loader import DataConfig
from vtok.errors import ConfigError
from vtok.models.registry import PRESETS, _merge, model_from_config

__all__ = [
    "DataConfig",
    "GANConfig",
    "LossConfig",
    "ModelSection",
    "OptimConfig",
    "TrainConfig",
    "TrainerConfig",
    "dump_yaml",
    "from_dict",
    "list_presets",
    "load_config",
    "merge_model_config",
    "parse_override",
    "resolved_model_config",
    "save_config",
    "to_dict",
    "validate",
]


# --- schema --------------------------------------------------------------------------------------
# Sections are plain dataclasses: the loader fills them in place, and nothing else should change them
# after load_config has validated them (the CLI flips trainer.progress for --quiet, nothing more).
@dataclass
class ModelSection:
    """A model preset of :data:`vtok.models.registry.PRESETS` and a config deep-merged over it.

    With ``preset`` null, ``config`` must be a full model config (architecture, encoder, quantizer).
    """

    preset: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW, linear warm-up then cosine decay to ``lr * min_lr_ratio`` at the last step."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 = off
    accumulate: int = 1  # micro-batches per optimizer step


@dataclass
class LossConfig:
    """Weights of the reconstruction, perceptual and Gram terms, and the quantizer-term schedule.

    ``quantizer`` multiplies the quantizer's own (already weighted) terms. The entropy term (LFQ, BSQ, IBQ)
    ramps 0 → 1 over ``entropy_warmup_steps``, then falls linearly to ``entropy_final_scale`` over
    ``entropy_anneal_steps`` (0 = no annealing).
    """

    l1: float = 1.0
    l2: float = 0.0
    perceptual: float = 0.0  # ST-LPIPS weight (vtok.losses.perceptual.STLPIPS)
    perceptual_net: str = "vgg"
    gram: float = 0.0  # Gram-matrix loss on the perceptual features (AToken)
    quantizer: float = 1.0
    entropy_warmup_steps: int = 0
    entropy_anneal_steps: int = 0
    entropy_final_scale: float = 1.0


@dataclass
class GANConfig:
    """PatchGAN discriminator; ``weight = 0`` turns it off entirely.

    The generator-side weight ramps linearly from 0 to ``weight`` over ``warmup_steps`` after
    ``start_step``; ``adaptive`` scales it by the VQGAN gradient-norm ratio at the decoder's last layer
    (clamped to ``adaptive_max``); ``lecam`` weights the LeCAM regulariser (Tseng et al. 2021).
    """

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
class TrainerConfig:
    """Run length, logging, validation and checkpoint cadence, EMA, device and precision."""

    steps: int = 1000
    log_every: int = 10
    val_every: int = 200
    ckpt_every: int = 200
    keep_last: int = 3
    ema_decay: float = 0.999  # 0 = no EMA
    max_bad_steps: int = 5  # non-finite losses: skip the step; stop after this many in a row
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | off
    usage_warn: float = 0.05  # warn loudly when codebook usage falls below this
    progress: bool = True


@dataclass
class TrainConfig:
    """The whole run; saved as ``config.yaml`` in the run folder and inside every checkpoint.

    ``data`` is :class:`vtok.data.loader.DataConfig` (the data pipeline owns that schema);
    ``data.batch_size`` is per micro-step and per rank.
    """

    seed: int = 0
    run_dir: str = "runs/{preset}"  # "{preset}" is replaced by the preset (or config file) name
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# --- rules beyond types --------------------------------------------------------------------------
# (data.* values are checked by DataConfig itself, the one schema for that section)
CHOICES: dict[str, tuple[str, ...]] = {
    "loss.perceptual_net": ("vgg", "alex"),
    "gan.loss": ("hinge", "non_saturating"),
    "trainer.amp": ("auto", "bf16", "off"),
}
# Allowed intervals, written as they appear in error messages: ">= 1", "> 0", "[0, 1)", "(0, 1]", ...
RANGES: dict[str, str] = {
    "seed": ">= 0",
    "optim.lr": "> 0", "optim.weight_decay": ">= 0", "optim.warmup_steps": ">= 0",
    "optim.min_lr_ratio": "[0, 1]", "optim.grad_clip": ">= 0", "optim.accumulate": ">= 1",
    "loss.l1": ">= 0", "loss.l2": ">= 0", "loss.perceptual": ">= 0", "loss.gram": ">= 0", "loss.quantizer": ">= 0",
    "loss.entropy_warmup_steps": ">= 0", "loss.entropy_anneal_steps": ">= 0", "loss.entropy_final_scale": ">= 0",
    "gan.weight": ">= 0", "gan.start_step": ">= 0", "gan.warmup_steps": ">= 0", "gan.adaptive_max": "> 0",
    "gan.lecam": ">= 0", "gan.lecam_decay": "[0, 1)", "gan.lr": "> 0", "gan.channels": ">= 1", "gan.layers": "[1, 6]",
    "trainer.steps": ">= 1", "trainer.log_every": ">= 1", "trainer.val_every": ">= 1", "trainer.ckpt_every": ">= 1",
    "trainer.keep_last": ">= 1", "trainer.ema_decay": "[0, 1)", "trainer.max_bad_steps": ">= 1",
    "trainer.usage_warn": "[0, 1]",
}
# list-valued keys: required length, and the interval every item must lie in
LISTS: dict[str, tuple[int, str]] = {"optim.betas": (2, "[0, 1)")}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


# --- YAML with 1.2 scalars -----------------------------------------------------------------------
_BOOL, _FLOAT, _TIMESTAMP = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"  # 1.5, 1., .5, 1.5e-3
    r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"  # 3e-4, 1E6
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class _Loader(yaml.SafeLoader):
    """Safe loader that resolves plain scalars by YAML 1.2 rules: ``off``/``yes`` stay strings, ``3e-4``
    is a float, and dates stay strings (PyYAML defaults to YAML 1.1)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT, _TIMESTAMP)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, _BOOL_RE, list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """Safe dumper that also quotes strings the 1.2 reader would take for floats (``"3e-4"``), so the file
    reads back the same with :class:`_Loader` and with plain ``yaml.safe_load``."""


_Dumper.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    """Lists of scalars on one line (``betas: [0.5, 0.9]``, ``channel_mult: [1, 2, 2, 4]``)."""
    flat = all(v is None or isinstance(v, (bool, int, float, str)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _represent_list)


def _yaml_load(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader derives from SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML ({at}{problem})") from None


def _read_mapping(text: str, where: str) -> dict[str, Any]:
    data = _yaml_load(text, where)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (seed, model, data, ...) at the top level")
    return data


# --- presets -------------------------------------------------------------------------------------
def _preset_files() -> dict[str, Any]:
    """Preset name -> resource, read through importlib.resources so an installed wheel works too."""
    folder = resources.files("vtok.train") / "presets"
    return {p.name[: -len(".yaml")]: p for p in folder.iterdir() if p.name.endswith(".yaml")}


def list_presets() -> list[str]:
    """Names of the training presets shipped with vtok (``vtok train --preset NAME``)."""
    return sorted(_preset_files())


def _unknown_preset(name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"available: {', '.join(sorted(known))}"
    return ConfigError(f"unknown training preset {name!r}; {hint}")


# --- schema walking ------------------------------------------------------------------------------
@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _leaf_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections expanded)."""
    out = []
    for f in fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _field_type(path: Sequence[str]) -> Any:
    """Annotation of the schema field at ``path``; None when the path is unknown or inside model.config."""
    cls: Any = TrainConfig
    for i, part in enumerate(path):
        if not dataclasses.is_dataclass(cls) or part not in _hints(cls):
            return None
        cls = _hints(cls)[part]
        if i < len(path) - 1 and not dataclasses.is_dataclass(cls):
            return None
    return cls


def merge_model_config(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of model configs, the registry's rule: a sub-config whose ``type`` changes replaces the old one."""
    return _merge(base, overrides)


def _did_you_mean(dotted: str, siblings: list[str]) -> str:
    """A suggestion for an unknown key: the same name in another section (``data.lr`` -> ``optim.lr``), else the
    closest spelling of its last part, a key of the same section preferred; else the section's valid keys."""
    def name(key: str) -> str:
        return key.rsplit(".", 1)[-1]

    def score(key: str) -> float:  # spelling of the last parts; a key in the same section needs less
        ratio = difflib.SequenceMatcher(None, name(dotted), name(key)).ratio()
        return ratio + 0.15 if key in siblings else ratio

    leaves = _leaf_keys()
    same_name = [k for k in leaves if name(k) == name(dotted)]  # data.lr -> optim.lr, steps -> trainer.steps
    best = max(siblings + leaves, key=score)
    close = same_name or ([best] if score(best) >= 0.75 else [])
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid: {', '.join(siblings)}"


# --- types ---------------------------------------------------------------------------------------
def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an int", float: "a number", str: "a string"}.get(tp, str(tp))


_PLURAL = {bool: "booleans", int: "ints", float: "numbers", str: "strings"}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp``: ints pass for floats (as floats), bools only for bools."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        try:
            return _coerce(value, inner, key)
        except ConfigError:
            raise ConfigError(f"{key} must be {_describe(tp)}, got {value!r}") from None
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {_PLURAL.get(item, item)}, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:  # pragma: no cover - a schema field of a type this function does not know
        raise TypeError(f"{key}: unsupported annotation {tp}")
    if not ok:
        raise ConfigError(f"{key} must be {_describe(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _apply(obj: Any, data: dict[str, Any], prefix: str, where: str) -> None:
    """Set the fields of section ``obj`` from ``data``, recursing into sub-sections; ``model.config`` merges."""
    hints = _hints(type(obj))
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in hints:
            siblings = [f"{prefix}{f.name}" for f in fields(obj)]
            raise ConfigError(f"{where}: unknown key '{dotted}'{_did_you_mean(str(dotted), siblings)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{dotted}' is a section; give it a mapping of keys, got {value!r}")
            _apply(current, value, f"{dotted}.", where)
        elif dotted == "model.config":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: model.config must be a mapping, got {value!r}")
            setattr(obj, key, merge_model_config(current, value))  # layers compose: preset, then file, then overrides
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}: {dotted}"))


# --- checks --------------------------------------------------------------------------------------
def _get(cfg: TrainConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _in_range(value: float, spec: str) -> bool:
    if spec.startswith((">=", "<=", ">", "<")):
        op, bound = re.match(r"([<>]=?)\s*(.+)", spec).groups()  # type: ignore[union-attr]
        b = float(bound)
        return {">=": value >= b, ">": value > b, "<=": value <= b, "<": value < b}[op]
    lo_b, lo, hi, hi_b = re.match(r"([\[(])\s*(.+?)\s*,\s*(.+?)\s*([\])])", spec).groups()  # type: ignore[union-attr]
    above = value >= float(lo) if lo_b == "[" else value > float(lo)
    below = value <= float(hi) if hi_b == "]" else value < float(hi)
    return above and below


def _check_values(cfg: TrainConfig) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    if not _DEVICE.fullmatch(cfg.trainer.device):
        raise ConfigError(f"trainer.device must be auto, cpu, cuda or cuda:N, got {cfg.trainer.device!r}")
    for key, spec in RANGES.items():
        value = _get(cfg, key)
        if not _in_range(value, spec):
            where = f"in {spec}" if spec[0] in "[(" else spec
            raise ConfigError(f"{key} must be {where}, got {value}")
    for key, (length, spec) in LISTS.items():
        value = _get(cfg, key)
        if len(value) != length or not all(_in_range(v, spec) for v in value):
            raise ConfigError(f"{key} must be a list of {length} numbers in {spec}, got {value}")
    dataclasses.replace(cfg.data)  # data.* values: the data pipeline's own checks (crop, sizes, scales)
    drivers = cfg.loss.l1 + cfg.loss.l2 + cfg.loss.perceptual + cfg.loss.gram + cfg.gan.weight
    if drivers == 0:
        raise ConfigError("loss.l1, loss.l2, loss.perceptual, loss.gram and gan.weight are all 0: "
                          "nothing would train the decoder")


def _check_model(cfg: TrainConfig) -> None:
    """The model section must name a known preset and resolve to a config that builds."""
    preset = cfg.model.preset
    if preset is not None and preset not in PRESETS:
        close = difflib.get_close_matches(preset, list(PRESETS), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "`vtok models` lists them"
        raise ConfigError(f"model.preset: unknown model preset {preset!r}; {hint}")
    config = resolved_model_config(cfg)
    try:
        with torch.device("meta"):  # builds the modules without allocating weights: bad options fail now
            model_from_config(config)
    except ConfigError as e:
        raise ConfigError(f"model: {_one_line(e)}") from None
    except (TypeError, ValueError, KeyError) as e:  # a wrongly typed option reached a constructor
        raise ConfigError(f"model: the model config does not build ({type(e).__name__}: {_one_line(e)})") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check value rules (choices, ranges, lengths) and that the model builds; returns ``cfg``."""
    _check_values(cfg)
    _check_model(cfg)
    return cfg


# --- entry points --------------------------------------------------------------------------------
def resolved_model_config(cfg: TrainConfig) -> dict[str, Any]:
    """The model preset's config deep-merged with ``model.config`` (:func:`merge_model_config`): exactly what
    the trainer builds."""
    if cfg.model.preset is None:
        base: dict[str, Any] = {}
    elif cfg.model.preset in PRESETS:
        base = PRESETS[cfg.model.preset].config
    else:
        raise ConfigError(f"model.preset: unknown model preset {cfg.model.preset!r}")
    merged = merge_model_config(base, cfg.model.config)
    if "quantizer" not in merged:
        raise ConfigError("model: set model.preset to a model preset (`vtok models`), or give model.config "
                          "a full model config with encoder and quantizer sections")
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=VALUE"`` → ``(["a", "b", "c"], VALUE read as YAML)``.

    A string field (``run_dir``, ``data.train``, ...) takes the text as written whatever YAML would make
    of it, so ``run_dir=2024`` is the folder ``"2024"``; ``null`` still means null where that is allowed.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. trainer.steps=2000)")
    path = key.split(".")
    tp = _field_type(path)
    is_str = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))
    if not raw.strip():
        return path, ""
    try:
        value = _yaml_load(raw, f"override {key}")
    except ConfigError:
        if not is_str:
            raise
        return path, raw.strip()
    if is_str and value is not None and not isinstance(value, str):
        value = raw.strip()  # e.g. data.train={a,b}.tar or run_dir=2024: the text is the value
    return path, value


def load_config(
    preset: str | None = None, file: str | Path | None = None, overrides: Sequence[str] = ()
) -> TrainConfig:
    """Defaults ← shipped preset ← YAML file ← dotted overrides, then validated.

    ``{preset}`` in ``run_dir`` becomes the preset name (else the file's stem, else ``run``).
    """
    cfg = TrainConfig()
    name: str | None = None
    if preset is not None:
        files = _preset_files()
        if preset not in files:
            raise _unknown_preset(preset, list(files))
        where = f"preset {preset}"
        _apply(cfg, _read_mapping(files[preset].read_text(encoding="utf-8"), where), "", where)
        name = preset
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read ({_one_line(e)})") from None
        _apply(cfg, _read_mapping(text, str(path)), "", str(path))
        name = name or path.stem
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for part in reversed(keys):
            nested = {part: nested}
        _apply(cfg, nested, "", "override")
    cfg.run_dir = cfg.run_dir.replace("{preset}", name or "run")
    return validate(cfg)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict of built-in types (YAML/JSON-ready); :func:`from_dict` inverts it."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """A validated config from :func:`to_dict` output (e.g. the config stored in a checkpoint).

    Missing keys take their defaults; unknown keys are rejected.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"saved config: expected a mapping, got {type(data).__name__}")
    cfg = TrainConfig()
    _apply(cfg, data, "", "saved config")
    return validate(cfg)


def dump_yaml(cfg: TrainConfig) -> str:
    """The config as YAML text that :func:`load_config` (``file=``) reads back to an equal config."""
    header = "# vtok training config, fully resolved; rerun with: vtok train --config THIS_FILE\n"
    return header + yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write :func:`dump_yaml` to ``path`` atomically (a crash leaves the old file or none, never half)."""
    atomic_write_text(path, dump_yaml(cfg))
