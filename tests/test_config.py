"""Training config: presets load and build, overrides apply with types, bad keys and values are rejected."""

from __future__ import annotations

import pytest
import torch
import yaml

from vtok.errors import ConfigError
from vtok.models.registry import model_from_config
from vtok.train.config import from_dict, list_presets, load_config, resolved_model_config, save_config, to_dict

FAMILIES = ["vq-f8", "llamagen-f8", "lfq-f8", "bsq-f8", "fsq-f8", "ibq-f8", "rvq-f8", "kl-f8"]


def test_every_family_has_a_small_and_a_tiny_preset() -> None:
    presets = set(list_presets())
    for family in FAMILIES:
        assert family in presets and f"{family}-tiny" in presets


@pytest.mark.parametrize("preset", sorted(list_presets()))
def test_every_preset_loads_and_its_model_builds(preset: str) -> None:
    cfg = load_config(preset=preset)
    assert cfg.run_dir == f"runs/{preset}"
    with torch.device("meta"):
        model = model_from_config(resolved_model_config(cfg))
    if preset.endswith("-tiny"):
        assert model.info.downsample == (8, 8) and cfg.trainer.steps <= 50


def test_overrides_apply_with_types() -> None:
    cfg = load_config(preset="vq-f8-tiny", overrides=[
        "trainer.steps=7", "optim.lr=3e-4", "optim.betas=[0.9, 0.95]", "data.val=null", "data.hflip=false",
        "gan.weight=1", "model.config.quantizer.codebook_size=32", "run_dir=/tmp/x"])
    assert cfg.trainer.steps == 7 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.betas == [0.9, 0.95] and cfg.data.val is None and cfg.data.hflip is False
    assert isinstance(cfg.gan.weight, float) and cfg.gan.weight == 1.0
    assert resolved_model_config(cfg)["quantizer"] == {"type": "vq", "dim": 4, "codebook_size": 32, "beta": 0.25}
    assert cfg.run_dir == "/tmp/x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.step=3", "unknown key 'trainer.step'; did you mean 'trainer.steps'?"),
        ("trainr.steps=3", "unknown key 'trainr'; did you mean 'trainer'?"),
        ("trainer.steps=abc", "trainer.steps must be an int, got 'abc'"),
        ("trainer.steps=2.5", "trainer.steps must be an int"),
        ("data.hflip=3", "data.hflip must be true or false"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("data.crop=zoom", "data.crop: 'zoom' is not one of random_resized, random, center"),
        ("trainer.steps=0", "trainer.steps must be >= 1"),
        ("trainer.ema_decay=1.5", "trainer.ema_decay must be in"),
        ("optim.betas=[0.9]", "optim.betas must be two numbers"),
        ("data=3", "'data' is a section"),
        ("steps", "must look like section.key=value"),
        ("model.config.quantizer.bogus=1", "unknown option"),
        ("model.preset=vq-f8-16", "did you mean 'vq-f8-16k'"),
    ],
)
def test_bad_overrides_are_rejected_with_a_clear_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(preset="vq-f8-tiny", overrides=[override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_preset_and_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'vq-f8-tiny'"):
        load_config(preset="vq-f8-tin")
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(file=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(file=bad)
    with pytest.raises(ConfigError, match=r"model\.config with encoder and quantizer"):
        load_config()


def test_user_file_composes_with_preset_and_round_trips(tmp_path) -> None:
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"trainer": {"steps": 11}, "model": {"config": {"quantizer": {"beta": 0.5}}}}))
    cfg = load_config(preset="vq-f8-tiny", file=user, overrides=["seed=3"])
    assert cfg.trainer.steps == 11 and cfg.seed == 3
    assert resolved_model_config(cfg)["quantizer"]["beta"] == 0.5
    assert resolved_model_config(cfg)["quantizer"]["codebook_size"] == 64  # the preset's value survives
    save_config(cfg, tmp_path / "saved.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "saved.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)
