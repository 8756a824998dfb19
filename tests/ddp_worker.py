"""Run by tests/test_train.py under torchrun: train, then save this rank's final weights for comparison."""

import os
import sys
from pathlib import Path

import torch

from vtok.train.config import load_config
from vtok.train.loop import train

if __name__ == "__main__":
    out = Path(sys.argv[1])
    preset, overrides = sys.argv[3], sys.argv[4:]
    cfg = load_config(preset=preset, overrides=[f"run_dir={out / 'run'}", "trainer.progress=false",
                                                "trainer.ema_decay=0", *overrides])
    result = train(cfg)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.state_dict(), out / f"rank{os.environ.get('RANK', '0')}.pt")
