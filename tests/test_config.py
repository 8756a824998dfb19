"""Training config: presets load and build, overrides apply with types, bad input fails with one clear line."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vtok.errors import ConfigError
from vtok.models.registry import PRESETS, model_from_config
from vtok.train.config import (
    TrainConfig,
    dump_yaml,
    from_dict,
    list_presets,
    load_config,
    merge_model_config,
    resolved_model_config,
    save_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["vq-f8", "llamagen-f8", "lfq-f8", "bsq-f8", "fsq-f8", "ibq-f8", "rvq-f8", "kl-f8"]


def _error(overrides: list[str], preset: str | None = "vq-f8-tiny", **kw) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(preset=preset, overrides=overrides, **kw)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# --- shipped presets -----------------------------------------------------------------------------
def test_every_family_has_a_small_and_a_tiny_preset_and_there_is_a_quickstart() -> None:
    presets = list_presets()
    assert presets == sorted(presets)
    for family in FAMILIES:
        assert family in presets and f"{family}-tiny" in presets
    assert "quickstart" in presets


def test_presets_are_package_data_found_through_importlib_resources() -> None:
    folder = resources.files("vtok.train") / "presets"
    names = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
    assert names == list_presets()
    # the wheel carries them only if pyproject declares them as package data
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "train/presets/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["vtok"]


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads_documents_itself_and_its_model_builds(preset: str) -> None:
    text = (resources.files("vtok.train") / "presets" / f"{preset}.yaml").read_text(encoding="utf-8")
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert len(comments) >= 3, f"{preset}.yaml should say in comments what recipe it follows and why"
    cfg = load_config(preset=preset)
    assert cfg.run_dir == f"runs/{preset}"
    config = resolved_model_config(cfg)
    with torch.device("meta"):
        model = model_from_config(config)
    assert cfg.loss.perceptual == 0 and cfg.gan.weight == 0  # CPU-trainable: no VGG, no discriminator
    if preset.endswith("-tiny"):
        enc = config["encoder"]
        assert model.info.downsample == (8, 8)
        assert enc["channels"] <= 16 and enc["num_res_blocks"] == 1 and not enc.get("mid_attention", True)
        assert not enc.get("attn_levels")
        assert (cfg.data.size, cfg.data.batch_size, cfg.data.val_images, cfg.trainer.steps) == (32, 4, 4, 20)
        assert max(cfg.trainer.log_every, cfg.trainer.val_every, cfg.trainer.ckpt_every) <= 10
    elif preset in FAMILIES:
        assert model.info.downsample == (8, 8) and cfg.data.size == 64
        assert sum(p.numel() for p in model.parameters()) < 5_000_000  # trainable on a CPU in tens of minutes


def test_small_and_tiny_presets_share_their_family() -> None:
    for family in FAMILIES:
        small = resolved_model_config(load_config(preset=family))["quantizer"]
        tiny = resolved_model_config(load_config(preset=f"{family}-tiny"))["quantizer"]
        assert small["type"] == tiny["type"]
        for option in ("kmeans_init", "dead_code_steps", "distance", "codebook_dim", "quantizer_dropout"):
            assert (option in small) == (option in tiny), (family, option)


def test_llamagen_preset_starts_from_a_registry_preset() -> None:
    cfg = load_config(preset="llamagen-f8")
    assert cfg.model.preset in PRESETS
    q = resolved_model_config(cfg)["quantizer"]
    assert q["distance"] == "cosine" and q["codebook_dim"] == 8 and q["codebook_size"] == 1024


def test_lfq_preset_warms_up_the_entropy_term() -> None:
    cfg = load_config(preset="lfq-f8")
    assert resolved_model_config(cfg)["quantizer"]["entropy_weight"] > 0 and cfg.loss.entropy_warmup_steps > 0


# --- overrides -----------------------------------------------------------------------------------
def test_overrides_of_every_type_apply() -> None:
    cfg = load_config(preset="vq-f8-tiny", overrides=[
        "trainer.steps=7",  # int
        "optim.lr=3e-4",  # float written without a dot (a string under YAML 1.1)
        "gan.weight=1",  # int accepted for a float
        "optim.betas=[0.9, 0.95]",  # list
        "data.val=null",  # null where allowed
        "data.hflip=false",  # bool
        "trainer.amp=off",  # a string YAML 1.1 would turn into False
        "run_dir=2024",  # a string field takes the text even when YAML reads a number
        "data.train=shards:/data/train-{000..009}.tar",
        "model.config.quantizer.codebook_size=32",  # into the free-form model dict
        "trainer={log_every: 1, ckpt_every: 2}",  # a whole section at once
        "seed=3",
    ])
    assert cfg.trainer.steps == 7 and cfg.optim.lr == pytest.approx(3e-4)
    assert isinstance(cfg.gan.weight, float) and cfg.gan.weight == 1.0
    assert cfg.optim.betas == [0.9, 0.95] and cfg.data.val is None and cfg.data.hflip is False
    assert cfg.trainer.amp == "off" and cfg.run_dir == "2024" and cfg.seed == 3
    assert cfg.data.train == "shards:/data/train-{000..009}.tar"
    assert (cfg.trainer.log_every, cfg.trainer.ckpt_every, cfg.trainer.val_every) == (1, 2, 10)
    q = resolved_model_config(cfg)["quantizer"]
    assert q["codebook_size"] == 32 and q["dim"] == 4 and q["kmeans_init"] is True  # the rest of the preset stays


def test_later_overrides_win_and_nested_model_keys_are_created() -> None:
    cfg = load_config(preset="fsq-f8-tiny", overrides=[
        "trainer.steps=5", "trainer.steps=6", "model.config.encoder.dropout=0.1", "model.config.decoder.channels=16"])
    config = resolved_model_config(cfg)
    assert cfg.trainer.steps == 6 and config["encoder"]["dropout"] == 0.1 and config["decoder"]["channels"] == 16


def test_changing_the_quantizer_type_replaces_its_options() -> None:
    cfg = load_config(preset="vq-f8-tiny", overrides=["model.config.quantizer={type: fsq, levels: [5, 5, 5]}"])
    assert resolved_model_config(cfg)["quantizer"] == {"type": "fsq", "levels": [5, 5, 5]}
    cfg = load_config(preset="vq-f8-tiny", overrides=[
        "model.config.quantizer.type=lfq", "model.config.quantizer.dim=5"])
    assert resolved_model_config(cfg)["quantizer"] == {"type": "lfq", "dim": 5}
    # the same rule over a registry preset, and inside residual stacks
    cfg = load_config(preset="llamagen-f8-tiny", overrides=["model.config.quantizer={type: fsq, levels: [8, 5]}"])
    assert resolved_model_config(cfg)["quantizer"] == {"type": "fsq", "levels": [8, 5]}
    base = {"quantizer": {"type": "residual", "num_quantizers": 2, "quantizer": {"type": "vq", "dim": 4}}}
    merged = merge_model_config(base, {"quantizer": {"quantizer": {"type": "fsq", "levels": [5]}}})
    assert merged["quantizer"] == {"type": "residual", "num_quantizers": 2, "quantizer": {"type": "fsq", "levels": [5]}}
    assert base["quantizer"]["quantizer"] == {"type": "vq", "dim": 4}  # inputs are not modified


def test_user_file_composes_with_preset_then_overrides(tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("trainer: {steps: 11, amp: off}\nmodel:\n  config:\n    quantizer: {beta: 0.5}\n")
    cfg = load_config(preset="vq-f8-tiny", file=user, overrides=["seed=3"])
    assert cfg.trainer.steps == 11 and cfg.trainer.amp == "off" and cfg.seed == 3
    q = resolved_model_config(cfg)["quantizer"]
    assert q["beta"] == 0.5 and q["codebook_size"] == 64  # the preset's value survives the file's merge
    assert cfg.run_dir == "runs/vq-f8-tiny"
    mine = tmp_path / "mine.yaml"
    mine.write_text("model: {preset: fsq-f8-64k}\ntrainer: {steps: 4}\n")
    assert load_config(file=mine).run_dir == "runs/mine"  # {preset} becomes the file's stem
    assert load_config(overrides=["model.preset=fsq-f8-64k"]).run_dir == "runs/run"


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.step=3", "unknown key 'trainer.step'; did you mean 'trainer.steps'?"),
        ("trainr.steps=3", "unknown key 'trainr'; did you mean 'trainer'?"),
        ("steps=3", "unknown key 'steps'; did you mean 'trainer.steps'?"),
        ("data.lr=0.1", "unknown key 'data.lr'; did you mean 'optim.lr'?"),
        ("trainer.zzz=1", "unknown key 'trainer.zzz'; valid: trainer.steps, trainer.log_every"),
        ("optim.betass=[0.5, 0.9]", "unknown key 'optim.betass'; did you mean 'optim.betas'?"),
        ("data.hflips=true", "unknown key 'data.hflips'; did you mean 'data.hflip'?"),
        ("optim.ema_dcay=0.9", "unknown key 'optim.ema_dcay'; did you mean 'trainer.ema_decay'?"),
        ("trainer.steps=abc", "trainer.steps must be an int, got 'abc'"),
        ("trainer.steps=2.5", "trainer.steps must be an int, got 2.5"),
        ("data.hflip=3", "data.hflip must be true or false, got 3"),
        ("data.hflip=yes", "data.hflip must be true or false, got 'yes'"),
        ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
        ("optim.lr=true", "optim.lr must be a number, got True"),
        ("optim.betas=0.9", "optim.betas must be a list of numbers, got 0.9"),
        ("optim.betas=[0.9]", "optim.betas must be a list of 2 numbers in [0, 1), got [0.9]"),
        ("optim.betas=[0.9, 1.0]", "optim.betas must be a list of 2 numbers in [0, 1), got [0.9, 1.0]"),
        ("optim.betas=[0.9, a]", "optim.betas must be a number, got 'a'"),
        ("gan.loss=wasserstein", "gan.loss must be one of hinge, non_saturating, got 'wasserstein'"),
        ("loss.perceptual_net=resnet", "loss.perceptual_net must be one of vgg, alex, got 'resnet'"),
        ("trainer.amp=fp16", "trainer.amp must be one of auto, bf16, off, got 'fp16'"),
        ("trainer.device=gpu", "trainer.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("data.crop=zoom", "data.crop: 'zoom' is not one of random_resized, random, center"),
        ("trainer.steps=0", "trainer.steps must be >= 1, got 0"),
        ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
        ("optim.accumulate=0", "optim.accumulate must be >= 1, got 0"),
        ("trainer.ema_decay=1", "trainer.ema_decay must be in [0, 1), got 1.0"),
        ("gan.lecam_decay=-0.1", "gan.lecam_decay must be in [0, 1), got -0.1"),
        ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be in [0, 1], got 2.0"),
        ("seed=-1", "seed must be >= 0, got -1"),
        ("loss.l1=0", "nothing would train the decoder"),
        ("data.batch_size=0", "data.batch_size"),
        ("data=3", "'data' is a section; give it a mapping of keys, got 3"),
        ("model.config=3", "model.config must be a mapping, got 3"),
        ("steps", "override 'steps' must look like section.key=value"),
        ("trainer..steps=1", "must look like section.key=value"),
        ("optim.betas=[0.9", "override optim.betas: not valid YAML"),
        ("model.config.quantizer.bogus=1", "model: quantizer 'vq' got unknown option(s) ['bogus']"),
        ("model.config.quantizer.codebook_size=abc", "model: the model config does not build"),
        ("model.config.encoder.channel_mult=[]", "model: channel_mult needs at least one level"),
        ("model.preset=vq-f8-16", "model.preset: unknown model preset 'vq-f8-16'; did you mean 'vq-f8-16k'"),
    ],
)
def test_bad_overrides_are_rejected_with_one_clear_line(override: str, message: str) -> None:
    assert message in _error([override])


def test_unknown_preset_suggests_close_names_or_lists_all() -> None:
    assert "unknown training preset 'vq-f8-tin'; did you mean 'vq-f8-tiny'" in _error([], preset="vq-f8-tin")
    message = _error([], preset="zzzz")
    assert "available: " in message and all(name in message for name in list_presets())


def test_bad_files_are_rejected(tmp_path: Path) -> None:
    assert "no such config file" in _error([], preset=None, file=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  steps: [1, 2\n")
    assert f"{bad}: not valid YAML (line " in _error([], preset=None, file=bad)
    bad.write_text("- 1\n- 2\n")
    assert "expected a mapping of sections" in _error([], preset=None, file=bad)
    bad.write_text("trainer: {stepz: 3}\n")
    assert f"{bad}: unknown key 'trainer.stepz'; did you mean 'trainer.steps'?" in _error([], preset=None, file=bad)
    assert "set model.preset to a model preset" in _error([], preset=None)  # no model at all


# --- round trips ---------------------------------------------------------------------------------
def test_to_dict_is_plain_and_from_dict_inverts_it() -> None:
    cfg = load_config(preset="rvq-f8-tiny", overrides=["data.val=null", "trainer.amp=off"])
    d = to_dict(cfg)
    assert yaml.safe_load(yaml.safe_dump(d)) == d  # plain built-in types only
    again = from_dict(d)
    assert again == cfg and again is not cfg and again.model.config is not cfg.model.config
    assert from_dict({"model": {"preset": "fsq-f8-64k"}}).trainer == TrainConfig().trainer  # missing keys: defaults
    with pytest.raises(ConfigError, match=r"saved config: unknown key 'trainer\.stepz'"):
        from_dict({**d, "trainer": {"stepz": 1}})


def test_save_config_writes_yaml_that_loads_back_equal(tmp_path: Path) -> None:
    cfg = load_config(preset="llamagen-f8-tiny", overrides=["trainer.amp=off", "run_dir=3e-4", "optim.lr=1e-6"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]  # no temporary file left behind
    text = path.read_text()
    assert "betas: [0.5, 0.9]" in text
    assert yaml.safe_load(text) == to_dict(cfg)  # plain PyYAML (YAML 1.1) reads the same values...
    assert load_config(file=path) == cfg  # ...and so does load_config
    save_config(load_config(preset="kl-f8-tiny"), path)  # overwrites atomically
    assert load_config(file=path).model.config["name"] == "kl-f8-tiny"


@settings(max_examples=25, deadline=None)
@given(
    steps=st.integers(1, 10**6),
    lr=st.floats(1e-8, 10.0, allow_nan=False),
    betas=st.lists(st.floats(0.0, 0.999), min_size=2, max_size=2),
    hflip=st.booleans(),
    amp=st.sampled_from(["auto", "bf16", "off"]),
    val=st.one_of(st.none(), st.sampled_from(["builtin:photos-val", "/data/val", "yes", "1e-3", "null x"])),
    codebook=st.integers(2, 4096),
)
def test_round_trips_through_dict_and_yaml(steps, lr, betas, hflip, amp, val, codebook, tmp_path_factory) -> None:
    cfg = load_config(preset="vq-f8-tiny", overrides=[
        f"trainer.steps={steps}", f"optim.lr={lr!r}", f"optim.betas={betas!r}", f"data.hflip={str(hflip).lower()}",
        f"trainer.amp={amp}", "data.val=null" if val is None else f"data.val={val}",
        f"model.config.quantizer.codebook_size={codebook}"])
    assert (cfg.trainer.steps, cfg.optim.lr, cfg.optim.betas, cfg.data.hflip) == (steps, lr, betas, hflip)
    assert cfg.trainer.amp == amp and cfg.data.val == val
    assert from_dict(to_dict(cfg)) == cfg
    assert yaml.safe_load(dump_yaml(cfg)) == to_dict(cfg)
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    save_config(cfg, path)
    assert load_config(file=path) == cfg


def test_sections_have_the_schema_names_and_defaults() -> None:
    cfg = TrainConfig()
    assert [f.name for f in dataclasses.fields(cfg)] == [
        "seed", "run_dir", "model", "data", "optim", "loss", "gan", "trainer"]
    assert (cfg.seed, cfg.run_dir, cfg.model.preset, cfg.model.config) == (0, "runs/{preset}", None, {})
    assert (cfg.data.train, cfg.data.val, cfg.data.size, cfg.data.crop) == (
        "builtin:photos", "builtin:photos-val", 64, "random_resized")
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.warmup_steps, cfg.optim.accumulate) == (1e-4, [0.5, 0.9], 100, 1)
    assert (cfg.loss.l1, cfg.loss.quantizer, cfg.loss.perceptual_net, cfg.loss.entropy_final_scale) == (
        1.0, 1.0, "vgg", 1.0)
    assert (cfg.gan.weight, cfg.gan.loss, cfg.gan.adaptive, cfg.gan.adaptive_max, cfg.gan.layers) == (
        0.0, "hinge", True, 1e4, 3)
    assert (cfg.trainer.steps, cfg.trainer.ema_decay, cfg.trainer.device, cfg.trainer.amp) == (
        1000, 0.999, "auto", "auto")
