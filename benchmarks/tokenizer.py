"""Throughput of the conv tokenizer next to this machine's own fp32 matmul and conv peaks.

Prints encode/decode images/s and achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode: convs,
matmuls and attention) for a preset at 256×256, batch 8, and the ratio to the best conv throughput measured
in the same run. Usage: ``python benchmarks/tokenizer.py [--preset vq-f8-16k] [--batch 8] [--size 256]``.
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F
from common import machine, median_seconds
from torch.utils.flop_counter import FlopCounterMode

import vtok


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def conv_peak(repeats: int) -> tuple[float, str]:
    """Best fp32 GFLOP/s over a few 3×3 conv shapes typical of tokenizer decoders."""
    best, best_shape = 0.0, ""
    for batch, ch, res in [(8, 128, 128), (8, 256, 64), (8, 512, 32)]:
        x = torch.randn(batch, ch, res, res)
        w = torch.randn(ch, ch, 3, 3)
        secs = median_seconds(lambda x=x, w=w: F.conv2d(x, w, padding=1), repeats)
        gflops = 2 * batch * ch * ch * 9 * res * res / secs / 1e9
        if gflops > best:
            best, best_shape = gflops, f"{batch}x{ch}x{res}x{res}, 3x3, {ch}->{ch}"
    return best, best_shape


def matmul_peak(repeats: int) -> float:
    a = torch.randn(4096, 4096)
    return 2 * 4096**3 / median_seconds(lambda: a @ a, repeats) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="vq-f8-16k")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    tok = vtok.create(args.preset).eval()
    images = torch.rand(args.batch, 3, args.size, args.size)
    print(f"# {datetime.date.today()} | {machine()}")
    print(f"# preset {args.preset}: f={tok.info.downsample[0]}, {sum(p.numel() for p in tok.parameters()) / 1e6:.1f}M "
          f"params, batch {args.batch} at {args.size}x{args.size}, fp32, no_grad")
    with torch.no_grad():
        tokens = tok.encode(images)
        enc_flops = count_flops(lambda: tok.encode(images))
        dec_flops = count_flops(lambda: tok.decode(tokens))
        enc_s = median_seconds(lambda: tok.encode(images), args.repeats)
        dec_s = median_seconds(lambda: tok.decode(tokens), args.repeats)
        peak, shape = conv_peak(args.repeats)
        mm = matmul_peak(args.repeats)
    enc_gf, dec_gf = enc_flops / enc_s / 1e9, dec_flops / dec_s / 1e9
    print(f"fp32 matmul peak (4096^3):       {mm:8.1f} GFLOP/s")
    print(f"fp32 conv peak ({shape}): {peak:8.1f} GFLOP/s")
    print(f"encode: {args.batch / enc_s:7.2f} images/s  {enc_flops / args.batch / 1e9:7.1f} GFLOP/image  "
          f"{enc_gf:7.1f} GFLOP/s  = {enc_gf / peak:5.1%} of conv peak")
    print(f"decode: {args.batch / dec_s:7.2f} images/s  {dec_flops / args.batch / 1e9:7.1f} GFLOP/image  "
          f"{dec_gf:7.1f} GFLOP/s  = {dec_gf / peak:5.1%} of conv peak")


if __name__ == "__main__":
    main()
