"""Held-out PSNR against wall time for each tiny training preset, as a table and a PNG plot.

Runs ``vtok train --preset NAME-tiny`` for every family (one after another, same machine), reads the
validation lines of each run's metrics.jsonl, prints a markdown table and draws ``curves.png`` with Pillow.
Usage: ``python benchmarks/train_curves.py --out /tmp/curves [--steps 200] [--val-every 25]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

from common import machine
from PIL import Image, ImageDraw

FAMILIES = ["vq-f8", "llamagen-f8", "lfq-f8", "bsq-f8", "fsq-f8", "ibq-f8", "rvq-f8", "kl-f8"]
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def run(preset: str, out: Path, steps: int, val_every: int) -> list[dict[str, float]]:
    run_dir = out / preset
    cmd = [sys.executable, "-m", "vtok", "train", "--preset", preset, f"run_dir={run_dir}", f"trainer.steps={steps}",
           f"trainer.val_every={val_every}", f"trainer.ckpt_every={steps}", "data.val_images=16",
           "trainer.progress=false", "--resume", "never"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{preset} failed:\n{proc.stderr[-2000:]}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [x for x in lines if "val/psnr" in x]


def plot(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    w, h, margin = 720, 420, 60
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    t_max = max(p["train_seconds"] for pts in curves.values() for p in pts)
    values = [p["val/psnr"] for pts in curves.values() for p in pts]
    lo, hi = int(min(values)) - 1, int(max(values)) + 1

    def xy(t: float, v: float) -> tuple[float, float]:
        return margin + (w - 2 * margin) * t / t_max, h - margin - (h - 2 * margin) * (v - lo) / (hi - lo)

    draw.rectangle([margin, margin, w - margin, h - margin], outline="black")
    for v in range(lo, hi + 1):
        y = xy(0, v)[1]
        draw.line([margin - 4, y, margin, y], fill="black")
        draw.text((margin - 30, y - 6), f"{v}", fill="black")
    for i in range(5):
        t = t_max * i / 4
        x = xy(t, lo)[0]
        draw.line([x, h - margin, x, h - margin + 4], fill="black")
        draw.text((x - 10, h - margin + 8), f"{t:.0f}s", fill="black")
    draw.text((w // 2 - 60, h - 24), "training wall time", fill="black")
    draw.text((8, 8), "held-out PSNR (dB) vs time, tiny presets", fill="black")
    for i, (name, pts) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        draw.line([xy(p["train_seconds"], p["val/psnr"]) for p in pts], fill=colour, width=2)
        draw.text((w - margin - 120, margin + 8 + 14 * i), name, fill=colour)
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--val-every", type=int, default=25)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# {datetime.date.today()} | {machine()}")
    curves = {}
    for family in FAMILIES:
        preset = f"{family}-tiny"
        curves[preset] = run(preset, args.out, args.steps, args.val_every)
        print(f"# {preset} done", file=sys.stderr)
    steps = [p["step"] for p in next(iter(curves.values()))]
    print("| preset | " + " | ".join(f"step {s}" for s in steps) + " | seconds |")
    print("|---|" + "---|" * (len(steps) + 1))
    for preset, pts in curves.items():
        cells = " | ".join(f"{p['val/psnr']:.2f}" for p in pts)
        print(f"| {preset} | {cells} | {pts[-1]['train_seconds']:.0f} |")
    plot(curves, args.out / "curves.png")
    print(f"\nplot: {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
