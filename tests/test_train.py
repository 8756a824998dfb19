"""The trainer end to end on tiny presets: logs and exports, SIGTERM and SIGKILL resume, DDP equivalence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vtok
from vtok.cli import main
from vtok.models.registry import model_from_config
from vtok.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from vtok.train.config import load_config, resolved_model_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ["trainer.log_every=2", "trainer.val_every=4", "data.val_images=4", "trainer.progress=false"]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vtok", *args], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run_dir))["model"]


@pytest.mark.parametrize("preset", ["fsq-f8-tiny", "vq-f8-tiny"])
def test_tiny_preset_trains_logs_and_exports(tmp_path: Path, preset: str, capsys) -> None:
    run = tmp_path / "run"
    code = main(["train", "--preset", preset, f"run_dir={run}", "trainer.steps=6", "trainer.ckpt_every=3",
                 "trainer.keep_last=1", *TINY])
    assert code == 0, capsys.readouterr().err
    assert (run / "config.yaml").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [2, 4, 6]
    assert all(x["loss"] == x["loss"] for x in lines if "loss" in x)  # finite numbers, not NaN
    val = [x for x in lines if "val/psnr" in x]
    assert [x["step"] for x in val] == [4, 6] and val[-1]["val/psnr"] > 0
    assert (run / "val" / "step-00000006.png").is_file()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000006.pt"]  # keep_last=1 pruned step 3
    tok = vtok.load(run / "export")
    with torch.no_grad():
        out = tok.reconstruct(torch.rand(1, 3, 24, 40))
    assert out.shape == (1, 3, 24, 40)


def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path: Path) -> None:
    common = ["train", "--preset", "vq-f8-tiny", "trainer.steps=10", "trainer.ckpt_every=3",
              "gan.weight=0.1", "gan.start_step=2", "gan.warmup_steps=2", "gan.lecam=0.01", *TINY]
    straight = tmp_path / "straight"
    assert _run([*common, f"run_dir={straight}"]).returncode == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "vtok", *common, f"run_dir={killed}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step-00000006.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(killed).name in ("step-00000006.pt", "step-00000009.pt")
    resumed = _run([*common, f"run_dir={killed}"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    a, b = _final_model(straight), _final_model(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    sa, sb = load_checkpoint(latest_checkpoint(straight)), load_checkpoint(latest_checkpoint(killed))
    assert all(torch.equal(sa["disc"][k], sb["disc"][k]) for k in sa["disc"])
    assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])


def test_sigterm_saves_a_checkpoint_and_exits_130(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "vtok", "train", "--preset", "fsq-f8-tiny", f"run_dir={run}",
                             "trainer.steps=100000", "trainer.ckpt_every=100000", *TINY],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "checkpoint saved" in err
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and load_checkpoint(ckpt)["step"] >= 2


def test_bad_override_is_one_line_error(tmp_path: Path, capsys) -> None:
    assert main(["train", "--preset", "fsq-f8-tiny", f"run_dir={tmp_path}", "trainer.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "trainer.steps" in err and "Traceback" not in err


def _ddp_weights(tmp_path: Path, nproc: int, extra: list[str]) -> list[dict[str, torch.Tensor]]:
    out = tmp_path / f"ddp{nproc}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "ddp_worker.py"), str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    common = ["--preset", "fsq-f8-tiny", "trainer.steps=4", "data.val=null"]
    two = _ddp_weights(tmp_path, 2, [*common, "data.batch_size=2"])
    one = _ddp_weights(tmp_path, 1, [*common, "data.batch_size=4"])[0]
    for k in one:
        assert torch.equal(two[0][k], two[1][k]), f"ranks diverged at {k}"
        if not k.endswith(".bias"):
            # Conv biases that feed a GroupNorm get only rounding noise as gradient, which Adam scales up to
            # lr-sized steps; they cannot change the output, so they are judged by the output below instead.
            torch.testing.assert_close(two[0][k], one[k], rtol=1e-4, atol=1e-5)
    cfg = load_config(preset="fsq-f8-tiny")
    models = []
    for state in (two[0], one):
        model = model_from_config(resolved_model_config(cfg)).eval()
        model.load_state_dict(state)
        models.append(model)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = models[0](x), models[1](x)
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=0, atol=1e-4)


def test_ddp_keeps_vq_codebook_state_identical_across_ranks(tmp_path: Path) -> None:
    ranks = _ddp_weights(tmp_path, 2, ["--preset", "vq-f8-tiny", "trainer.steps=3", "data.val=null",
                                       "model.config.quantizer.learning=ema",
                                       "model.config.quantizer.kmeans_init=true",
                                       "model.config.quantizer.dead_code_steps=1"])
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), f"ranks diverged at {k}"
