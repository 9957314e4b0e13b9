"""``python -m fd_onestep.demos.digits --output_dir DIR ...``: the bundled digits teacher's baselines and trained
students (:func:`~fd_onestep.demos.digits.baselines.digits_teacher_baselines`); prints the tables."""

from __future__ import annotations

from pathlib import Path

from .baselines import digits_teacher_baselines
from ...comparison.report import JSON_FILENAME, RUNS_TABLE_FILENAME, SPREAD_TABLE_FILENAME, TABLE_FILENAME, format_training_runs_table


def _student_arg(item: str) -> tuple[str, str]:
    name, sep, folder = item.partition("=")
    if not sep or not name or not folder:
        raise ValueError(f"--students takes NAME=FOLDER (e.g. 'beta 0.8=runs/b08'), got {item!r}")
    return name, folder


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fd_onestep.demos.digits",
        description="FD of the bundled digits teacher (naive one step vs its sampler) and of trained students.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--sampler", default="dpmsolver++", choices=["dpmsolver++", "ddim", "ddpm"])
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument(
        "--extra", nargs="*", default=[], metavar="SAMPLER:STEPS", help="more samplers to compare, e.g. ddim:50"
    )
    parser.add_argument(
        "--students", nargs="*", default=[], metavar="NAME=FOLDER",
        help="one-step pipelines written by train_fd_onestep.py to compare too, e.g. 'student=digits-onestep'",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--spread_seeds", type=int, nargs="*", default=[], metavar="SEED",
        help="repeat the FDs over these seeds (two or more) and write seed_spread.md / .json (mean ± std)",
    )
    parser.add_argument(
        "--summarize", nargs="*", default=[], metavar="NAME=DIR[,DIR...]",
        help="instead of sampling: summarize training runs (each DIR a train_fd_onestep.py output folder with its "
             "comparison.json, one per training seed) as mean ± std per group, into OUTPUT_DIR/training_runs.md",
    )
    parser.add_argument("--student", default="student, 1 step (FD-loss)", help="--summarize: the student's name")
    parser.add_argument("--baseline", default="teacher, dpmsolver++ 20 steps", help="--summarize: the baseline's name")
    args = parser.parse_args(argv)
    if args.summarize:
        import json

        groups = {}
        for item in args.summarize:
            name, sep, dirs = item.partition("=")
            if not sep or not name or not dirs:
                parser.error(f"--summarize takes NAME=DIR[,DIR...], got {item!r}")
            groups[name] = [json.loads(Path(d, JSON_FILENAME).read_text()) for d in dirs.split(",")]
        table = format_training_runs_table(groups, args.student, args.baseline)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        Path(args.output_dir, RUNS_TABLE_FILENAME).write_text(table)
        print(table)
        return
    extra = []
    for item in args.extra:
        name, _, steps = item.partition(":")
        if not steps.isdigit():
            parser.error(f"--extra takes SAMPLER:STEPS (e.g. ddim:50), got {item!r}")
        extra.append((name, int(steps)))
    try:
        students = dict(_student_arg(item) for item in args.students)
    except ValueError as err:
        parser.error(str(err))
    seeds = args.spread_seeds
    if seeds and (len(seeds) < 2 or len(set(seeds)) != len(seeds)):
        # checked before minutes of sampling, not after
        parser.error(f"--spread_seeds needs two or more seeds, all distinct, got {seeds} (a standard deviation "
                     "of one value is undefined)")
    digits_teacher_baselines(
        args.output_dir,
        num_samples=args.num_samples,
        sampler=args.sampler,
        num_inference_steps=args.num_inference_steps,
        extra_samplers=extra,
        students=students,
        seed=args.seed,
        spread_seeds=args.spread_seeds,
    )
    print(Path(args.output_dir, TABLE_FILENAME).read_text())
    if args.spread_seeds:
        print(Path(args.output_dir, SPREAD_TABLE_FILENAME).read_text())


if __name__ == "__main__":
    main()
