"""Benchmark: the denoiser's forward + backward in channels_last vs the default (contiguous) memory format.

    python benchmarks/bench_channels_last.py             # the bundled digits UNet, batch 64, 2 threads
    python benchmarks/bench_channels_last.py --quick     # fewer repeats: a smoke run

This is the cost that dominates a step of the offline default (``train_fd_onestep.py`` with no model
arguments), which turns ``--channels_last`` on. Both layouts run the same UNet on the same input, interleaved
(so machine contention hits both), best of ``--repeats`` rounds of ``--iters`` steps each; the table gives
seconds per step and the ratio. The outputs of the two layouts agree to float32 round-off (also printed).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

from fd_onestep.demos import digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_utils import best_of, parse_timing_args, setup_line, timing_parser  # noqa: E402


def step_seconds(unet, x, t, iters: int) -> float:
    """Mean seconds of ``iters`` forward + backward passes (sum of the output as the loss)."""
    start = time.perf_counter()
    for _ in range(iters):
        unet.zero_grad(set_to_none=True)
        unet(x, t).sample.sum().backward()
    return (time.perf_counter() - start) / iters


def main(argv=None):
    parser = timing_parser(__doc__.splitlines()[0], iters=10)
    parser.add_argument("--timestep", type=int, default=600)
    args = parse_timing_args(parser, argv)

    contiguous = digits.load_digits_teacher().unet
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    size = contiguous.config.sample_size
    x = torch.randn(args.batch_size, contiguous.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.full((args.batch_size,), args.timestep)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        diff = float((contiguous(x, t).sample - channels_last(x_cl, t).sample).abs().max())

    # the warm-up also creates oneDNN's primitives
    best = best_of({"contiguous": lambda n: step_seconds(contiguous, x, t, n),
                    "channels_last": lambda n: step_seconds(channels_last, x_cl, t, n)}, args.iters, args.repeats)

    print(f"digits UNet ({sum(p.numel() for p in contiguous.parameters()):,} parameters), batch {args.batch_size}; "
          f"{setup_line(args)}; max |output difference| {diff:.1e}")
    print()
    print("| layout | forward + backward (s) | vs contiguous |")
    print("|---|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} | {best['contiguous'] / seconds:.2f}x faster |")


if __name__ == "__main__":
    main()
