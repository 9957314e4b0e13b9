"""What the benchmarks share: their timing options, the interleaved best-of timing, and where records go.

A benchmark that keeps its figures writes them as a JSON record into ``results/`` at the repository root
(indexed in results/README.md), beside the table it prints.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Callable, Mapping

import torch

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def timing_parser(description: str, *, iters: int, batch_size: int = 64) -> argparse.ArgumentParser:
    """``--batch_size --threads --iters --repeats --quick``; add a benchmark's own options to it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--iters", type=int, default=iters, help="Steps per timed round.")
    parser.add_argument("--repeats", type=int, default=5, help="Rounds; the best one counts.")
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 round: a smoke run.")
    return parser


def parse_timing_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, shrink the rounds for ``--quick`` and set torch's threads."""
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.repeats = 2, 1
    torch.set_num_threads(args.threads)
    return args


def setup_line(args: argparse.Namespace) -> str:
    """What the timings ran on, for the line above a benchmark's table."""
    return (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
            f"best of {args.repeats} x {args.iters} steps")


def best_of(timers: Mapping[str, Callable[[int], float]], iters: int, repeats: int) -> dict[str, float]:
    """Best seconds per step of each ``timer(iters)``, rounds interleaved so that contention hits all alike,
    after a 2-step warm-up of each."""
    for timer in timers.values():
        timer(2)
    best = {name: float("inf") for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            best[name] = min(best[name], timer(iters))
    return best


def write_record(data: dict, path: str | Path) -> Path:
    """``data`` as indented JSON at ``path`` (a run record: see results/README.md)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
