"""Benchmark: what the joint FD-loss costs over the marginal one, per training step.

    python benchmarks/bench_joint_loss.py            # the digits-class default's three training encoders
    python benchmarks/bench_joint_loss.py --quick    # fewer repeats: a smoke run

The joint loss (``--fd_condition joint``) feeds each encoder's population ``[features, alpha * one_hot]``
(d + C instead of d): the FD step (population update, the closed-form FD and its backward) grows from d to
d + C. This times exactly that part -- ``MultiEncoderFDLoss`` forward + backward on precomputed features of the
bundled digits encoders' sizes (64, 64, 256) at batch 64, 10 classes, EMA populations warm-started -- marginal
and joint interleaved (machine contention hits both), best of ``--repeats`` rounds of ``--iters`` steps. The
denoiser and the encoders, the bulk of a step, are the same for both losses and are not timed here; the table
also gives the share of one digits training step this part is (``--step_seconds``, default: the main job's
measured 0.2558 s floor on a 2-core CPU).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from fd_onestep.demos import digits
from fd_onestep.conditioning_metrics import ClassConditionalStats, LabelEmbedding
from fd_onestep.losses import FDLoss, MultiEncoderFDLoss
from fd_onestep.populations import build_population

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_utils import best_of, parse_timing_args, setup_line, timing_parser  # noqa: E402


def build_losses(joint: bool, beta: float, warm: dict, labels: torch.Tensor) -> MultiEncoderFDLoss:
    losses = {}
    for name in digits.TRAINING_ENCODERS:
        stats = ClassConditionalStats.load(digits.class_stats_path(name))
        if joint:
            embedding = LabelEmbedding(stats.num_classes, stats.alpha)
            reference, dim = stats.joint_reference_at(stats.alpha), stats.feature_dim + stats.num_classes
        else:
            embedding, reference, dim = None, digits.load_bundled_references([name])[name], stats.feature_dim
        loss = FDLoss(reference, build_population("ema", dim, beta=beta), label_embedding=embedding)
        loss.warm_start([warm[name]], [labels] if joint else None)
        losses[name] = loss
    return MultiEncoderFDLoss(losses, weights={"pixels-digits": 2.0})


def step_seconds(loss_fn, features: dict, labels, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        feats = {k: v.clone().requires_grad_() for k, v in features.items()}
        loss_fn.begin_step()
        loss, _ = loss_fn(feats, labels)
        loss.backward()
        loss_fn.end_step()
    return (time.perf_counter() - start) / iters


def main(argv=None):
    parser = timing_parser(__doc__.splitlines()[0], iters=20)
    parser.add_argument("--step_seconds", type=float, default=0.2558, help="One training step's floor, for the share.")
    args = parse_timing_args(parser, argv)
    g = torch.Generator().manual_seed(0)
    dims = {name: ClassConditionalStats.load(digits.class_stats_path(name)).feature_dim for name in digits.TRAINING_ENCODERS}
    warm_labels = torch.arange(2048) % digits.NUM_CLASSES
    warm = {name: torch.randn(2048, d, generator=g) for name, d in dims.items()}
    features = {name: torch.randn(args.batch_size, d, generator=g) for name, d in dims.items()}
    labels = torch.randint(0, digits.NUM_CLASSES, (args.batch_size,), generator=g)
    marginal = build_losses(False, 0.8, warm, warm_labels)
    joint = build_losses(True, 0.8, warm, warm_labels)
    best = best_of({"marginal": lambda n: step_seconds(marginal, features, None, n),
                    "joint": lambda n: step_seconds(joint, features, labels, n)}, args.iters, args.repeats)

    print(f"FD-loss step (3 encoders, d = {', '.join(map(str, dims.values()))}, + {digits.NUM_CLASSES} label dims "
          f"when joint), batch {args.batch_size}; {setup_line(args)}")
    print()
    print("| loss | ms per step | ratio to marginal | share of a 1-step floor of "
          f"{args.step_seconds:.4f} s |")
    print("|---|---:|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {1e3 * seconds:.2f} | {seconds / best['marginal']:.2f}x | "
              f"{100 * seconds / args.step_seconds:.1f}% |")
    extra = best["joint"] - best["marginal"]
    print()
    print(f"joint - marginal: {1e3 * extra:+.2f} ms per step = {100 * extra / args.step_seconds:+.1f}% of the floor "
          f"({extra * 1000:+.1f} s over 1,000 steps)")


if __name__ == "__main__":
    main()
