"""Quantizer speed and memory: vtok next to vector-quantize-pytorch on identical inputs, in one run.

For each case, one training step (forward + backward of ``mean(q²) + aux losses``) on 2048 tokens, timed
as the median over repeats after a warm-up, each implementation in a fresh subprocess so that the peak
resident memory (above the process's RSS before the quantizer is built) belongs to that case alone.
Usage: ``python benchmarks/quantizers.py [--cases vq16k,vq256k,lfq18,fsq64k] [--repeats 3]``.
vector-quantize-pytorch is a dev dependency (``pip install -e '.[dev]'``); without it only vtok runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import machine, peak_rss_bytes, reset_peak_rss

TOKENS = 2048

# case -> (description, input dim, vtok config, peer constructor given the vector_quantize_pytorch module)
CASES: dict[str, tuple[str, int, dict[str, Any], Callable[[Any], torch.nn.Module]]] = {
    "vq16k": (
        "VQ K=16384 d=8 cosine",
        8,
        {"type": "vq", "dim": 8, "codebook_size": 16384, "distance": "cosine"},
        lambda vqp: vqp.VectorQuantize(dim=8, codebook_size=16384, use_cosine_sim=True),
    ),
    "vq256k": (
        "VQ K=2^18 d=256",
        256,
        {"type": "vq", "dim": 256, "codebook_size": 2**18},
        lambda vqp: vqp.VectorQuantize(dim=256, codebook_size=2**18),
    ),
    "lfq18": (
        "LFQ 18 bits + entropy loss (exact)",
        18,
        {"type": "lfq", "dim": 18, "entropy_weight": 0.1},
        lambda vqp: vqp.LFQ(dim=18, codebook_size=2**18, entropy_loss_weight=0.1),
    ),
    "fsq64k": (
        "FSQ levels 8,8,8,5,5,5 (64000 codes)",
        6,
        {"type": "fsq", "levels": [8, 8, 8, 5, 5, 5]},
        lambda vqp: vqp.FSQ(levels=[8, 8, 8, 5, 5, 5]),
    ),
}


def run_one(case: str, impl: str, repeats: int) -> dict[str, float]:
    """Time one case in this process; returns seconds per step and peak RSS above the starting RSS."""
    _, dim, vtok_config, make_peer = CASES[case]
    torch.manual_seed(0)
    z = torch.randn(1, TOKENS, dim)
    base_rss = reset_peak_rss()
    if impl == "vtok":
        from vtok.quantizers import build_quantizer

        module = build_quantizer(vtok_config).train()
        x = z.transpose(1, 2).contiguous()  # vtok is channels-first (B, C, N)

        def step() -> None:
            inp = x.detach().requires_grad_(True)
            out = module(inp)
            (out.quantized.square().mean() + out.loss).backward()
    else:
        import vector_quantize_pytorch as vqp

        module = make_peer(vqp).train()

        def step() -> None:
            inp = z.detach().requires_grad_(True)
            out = module(inp)  # (quantized, indices[, aux loss]); FSQ has no aux loss
            aux = out[2].sum() if len(out) > 2 else 0.0
            (out[0].square().mean() + aux).backward()

    start = time.perf_counter()
    step()  # warm-up (allocations, k-means-free first pass)
    first = time.perf_counter() - start
    times = []
    for _ in range(1 if first > 5 else repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"seconds": times[len(times) // 2], "peak_bytes": peak_rss_bytes() - base_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", default="vtok,peer")
    parser.add_argument("--run", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run[0], args.run[1], args.repeats)))
        return

    impls = args.impls.split(",")
    if "peer" in impls:
        try:
            import vector_quantize_pytorch  # noqa: F401
        except ImportError:
            print("# vector-quantize-pytorch not installed (pip install -e '.[dev]'): timing vtok only")
            impls = [i for i in impls if i != "peer"]
    print(f"# {datetime.date.today()} | {machine()}")
    print(f"# forward+backward on {TOKENS} tokens; median of {args.repeats} after warm-up; peak = RSS high-water "
          "mark above the RSS before the quantizer was built (codebook, gradients and temporaries)")
    print(f"{'case':38s} {'impl':5s} {'s/step':>9s} {'peak MB':>9s}")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for case in args.cases.split(","):
        if case not in CASES:
            sys.exit(f"unknown case {case!r}; choose from {', '.join(CASES)}")
        for impl in impls:
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--run", case, impl, "--repeats", str(args.repeats)],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                print(f"{CASES[case][0]:38s} {impl:5s} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.setdefault(case, {})[impl] = res
            print(f"{CASES[case][0]:38s} {impl:5s} {res['seconds']:9.4f} {res['peak_bytes'] / 2**20:9.0f}", flush=True)
    print("\nratios (peer / vtok; >1 means vtok is faster / leaner):")
    for case, res in results.items():
        if "vtok" in res and "peer" in res:
            speed = res["peer"]["seconds"] / res["vtok"]["seconds"]
            mem = res["peer"]["peak_bytes"] / max(res["vtok"]["peak_bytes"], 1)
            print(f"  {CASES[case][0]:38s} speed {speed:7.2f}x   memory {mem:7.2f}x")


if __name__ == "__main__":
    main()
