"""Benchmark: the denoiser's forward + backward in channels_last vs the default (contiguous) memory format.

    python benchmarks/bench_channels_last.py             # the bundled digits UNet, batch 64, 2 threads
    python benchmarks/bench_channels_last.py --quick     # fewer repeats: a smoke run

This is the cost that dominates a step of the offline default (``train_fd_onestep.py`` with no model
arguments), which turns ``--channels_last`` on. Both layouts run the same UNet on the same input, interleaved
(so machine contention hits both), best of ``--repeats`` rounds of ``--iters`` steps each; the table gives
seconds per step and the ratio. The outputs of the two layouts agree to float32 round-off (also printed).
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

from fd_onestep.demos import digits


def step_seconds(unet, x, t, iters: int) -> float:
    """Mean seconds of ``iters`` forward + backward passes (sum of the output as the loss)."""
    start = time.perf_counter()
    for _ in range(iters):
        unet.zero_grad(set_to_none=True)
        unet(x, t).sample.sum().backward()
    return (time.perf_counter() - start) / iters


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--timestep", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.repeats = 2, 1
    torch.set_num_threads(args.threads)

    contiguous = digits.load_digits_teacher().unet
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    size = contiguous.config.sample_size
    x = torch.randn(args.batch_size, contiguous.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.full((args.batch_size,), args.timestep)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        diff = float((contiguous(x, t).sample - channels_last(x_cl, t).sample).abs().max())

    best = {"contiguous": float("inf"), "channels_last": float("inf")}
    for model, inp in ((contiguous, x), (channels_last, x_cl)):  # warm-up (oneDNN primitive creation)
        step_seconds(model, inp, t, 2)
    for _ in range(args.repeats):
        best["contiguous"] = min(best["contiguous"], step_seconds(contiguous, x, t, args.iters))
        best["channels_last"] = min(best["channels_last"], step_seconds(channels_last, x_cl, t, args.iters))

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"digits UNet ({sum(p.numel() for p in contiguous.parameters()):,} parameters), batch {args.batch_size}, "
          f"best of {args.repeats} x {args.iters} steps; max |output difference| {diff:.1e}")
    print()
    print("| layout | forward + backward (s) | vs contiguous |")
    print("|---|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} | {best['contiguous'] / seconds:.2f}x faster |")


if __name__ == "__main__":
    main()
