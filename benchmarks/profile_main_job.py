"""Profile of the offline main job: where each second goes, against the floor of its training steps.

    python benchmarks/profile_main_job.py --output_dir /tmp/profile            # the README's main job, timed
    python benchmarks/profile_main_job.py --output_dir /tmp/p --quick           # 20 steps, small counts
    python benchmarks/profile_main_job.py --output_dir /tmp/p -- --max_train_steps 500   # script arguments
    python benchmarks/profile_main_job.py --output_dir /tmp/readme --end_to_end  # the README command, wall time

Runs ``train_scripts/train_fd_onestep.py``'s ``main()`` in this process with the offline embedded default
(plus any script arguments after ``--``), with timers around its parts, then measures in the same sitting
the **floor** of one training step: the denoiser plus the training encoders, forward + backward at the run's
batch size, in the run's memory format, best of 3 rounds of 10 steps. Prints a table of seconds per part (each
second is charged to one part only: validation's sampling counts as validation, not as denoiser forward) and
the whole job's time as a ratio to the floor of 1,000 steps. The floor is measured before and after the job
(the smaller one is used: the conservative ratio) and, because the machine's speed drifts, also interleaved
with the job: one block of 10 floor steps before each validation, on a copy of the UNet (the job's
trajectory is untouched; the blocks' time is not charged to the job). Writes the same numbers to
``OUTPUT_DIR/profile.json`` and, as a run record, to ``--record`` (default ``results/main_job_profile.json``; none
with ``--quick``). Nothing else may run on the machine while it measures.

``--end_to_end`` times the README's command itself instead (``accelerate launch train_scripts/train_fd_onestep.py
--output_dir OUTPUT_DIR`` in a child process: launcher, imports and all), between the same two floor
measurements, and writes ``OUTPUT_DIR/end_to_end.json`` (and the record, default
``results/main_job_end_to_end.json``): the README's measure of the main job's speed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "train_fd_onestep.py"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_utils import RESULTS_DIR, write_record  # noqa: E402
ROOT = "other (startup, logging, the loop itself)"
STEP = "training step: the rest (noise draws, syncs)"
# floor blocks run between the job's parts (before each validation): not part of the job, subtracted from it
PROBE = "floor probes (not the job)"
# the step count of the main job's speed target (issue: "1.3x the floor of 1,000 default steps")
REFERENCE_STEPS = 1000
# parts inside a training step, charged only while a step runs
STEP_PARTS = ("denoiser forward", "encoders forward", "FD math and populations",
              "backward (denoiser + encoders)", "optimizer (clip, AdamW, schedule)")


class Profile:
    """Exclusive wall-time accounting over a stack of named parts."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.stack = [[ROOT, time.perf_counter()]]

    def _switch(self):
        now = time.perf_counter()
        top = self.stack[-1]
        self.seconds[top[0]] += now - top[1]
        return now

    @contextlib.contextmanager
    def part(self, name: str):
        """Charge the time inside to ``name`` (and not to the part around it)."""
        self.stack.append([name, self._switch()])
        self.calls[name] += 1
        try:
            yield
        finally:
            now = self._switch()
            self.stack.pop()
            self.stack[-1][1] = now

    def wrap(self, owner, attr: str, name: str, inside_step: bool = False, before=None) -> None:
        """Time ``owner.attr`` as part ``name``; ``before()``, if given, runs first, charged to :data:`PROBE`."""
        original = getattr(owner, attr)
        profile = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if inside_step and profile.stack[-1][0] != STEP:
                return original(*args, **kwargs)
            if before is not None:
                with profile.part(PROBE):
                    before()
            with profile.part(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)

    def total(self) -> float:
        """Seconds charged to the job's parts (floor probes excluded)."""
        self._switch()
        self.stack[-1][1] = time.perf_counter()
        return sum(sec for name, sec in self.seconds.items() if name != PROBE)


def load_script():
    spec = importlib.util.spec_from_file_location("train_fd_onestep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def instrument(script, profile: Profile, probe=None) -> None:
    """Timers around the script's parts; ``probe()``, if given, runs before every validation (a floor block)."""
    from accelerate import Accelerator

    for name in ("build_one_step_pipeline", "build_representations", "build_generator", "build_fd_loss"):
        profile.wrap(script, name, "startup: teacher, encoders and statistics")
    profile.wrap(Accelerator, "prepare", "startup: teacher, encoders and statistics")
    profile.wrap(script, "warm_start_populations", "population warm start")
    profile.wrap(script, "train_step", STEP)
    profile.wrap(script, "generate_images", "denoiser forward", inside_step=True)
    profile.wrap(script, "encode", "encoders forward", inside_step=True)
    from fd_onestep.losses import MultiEncoderFDLoss

    for attr in ("forward", "accumulate", "begin_step", "end_accumulation"):
        profile.wrap(MultiEncoderFDLoss, attr, "FD math and populations", inside_step=True)
    profile.wrap(Accelerator, "backward", "backward (denoiser + encoders)", inside_step=True)
    profile.wrap(Accelerator, "clip_grad_norm_", "optimizer (clip, AdamW, schedule)", inside_step=True)
    profile.wrap(torch.optim.AdamW, "step", "optimizer (clip, AdamW, schedule)", inside_step=True)
    profile.wrap(script, "log_validation", "validation (grid, fresh-sample FDs)", before=probe)
    profile.wrap(script, "save_weights_atomically", "best-pipeline saves")
    profile.wrap(script, "save_checkpoint", "checkpoints")
    profile.wrap(script, "save_final_weights", "final weights")
    profile.wrap(script, "write_samples", "sample PNGs")
    time_comparison(script, profile)
    profile.wrap(script, "save_model_card", "model card")


COMPARISON = "comparison (teacher naive + multi-step, student)"


class TimedHooks:
    """A demo's hooks (the object its config names) with the hooks in ``parts`` timed as ``parts[hook]``."""

    def __init__(self, demo, profile: Profile, parts: dict[str, str]):
        self._demo, self._profile, self._parts = demo, profile, parts

    def __getattr__(self, attr):
        value = getattr(self._demo, attr)
        if attr not in self._parts or not callable(value):
            return value
        profile, name = self._profile, self._parts[attr]

        @functools.wraps(value)
        def timed(*args, **kwargs):
            with profile.part(name):
                return value(*args, **kwargs)

        return timed


def time_comparison(script, profile: Profile) -> None:
    """Time the end-of-run comparison as :data:`COMPARISON`, whichever way the script reaches it: its own
    ``run_comparison`` (a run without a demo) or the ``run_comparison`` hook of the demo its config names
    (``script.demo_of(args)``: the digits demos)."""
    profile.wrap(script, "run_comparison", COMPARISON)
    original = script.demo_of

    @functools.wraps(original)
    def demo_of(args):
        demo = original(args)
        return None if demo is None else TimedHooks(demo, profile, {"run_comparison": COMPARISON})

    script.demo_of = demo_of


class Floor:
    """One training step's unavoidable work: the denoiser + the training encoders, forward + backward.

    A copy of the teacher's UNet at the run's batch size and memory format, fed fixed noise (no global RNG
    draws, no dropout in the digits UNet: probing between the job's steps leaves its trajectory alone).
    """

    def __init__(self, script, args):
        device = torch.device("cpu")
        pipe = script.build_one_step_pipeline(args)
        self.encoders = script.build_representations(args, device).encoders
        self.unet = pipe.denoiser.to(device).train().requires_grad_(True)
        if args.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        g = torch.Generator().manual_seed(0)
        size = pipe.config.sample_size
        # contiguous noise into channels_last weights, as OneStepGenerator.sample_noise feeds the script's denoiser
        self.x = torch.randn(args.train_batch_size, self.unet.config.in_channels, size, size, generator=g)
        self.t = torch.full((args.train_batch_size,), pipe.config.timestep)
        for _ in range(2):  # warm-up (oneDNN primitive creation)
            self.step()

    def step(self) -> None:
        self.unet.zero_grad(set_to_none=True)
        images = self.unet(self.x, self.t).sample.float().clamp(-1, 1)
        loss = sum(enc(images).pow(2).mean() for enc in self.encoders.values())
        loss.backward()

    def block(self, iters: int = 10) -> float:
        """Mean seconds per step over ``iters`` consecutive steps."""
        start = time.perf_counter()
        for _ in range(iters):
            self.step()
        return (time.perf_counter() - start) / iters

    def best(self, repeats: int = 3, iters: int = 10) -> float:
        """Best of ``repeats`` blocks: the issue's measure of the floor."""
        return min(self.block(iters) for _ in range(repeats))


def end_to_end(script, args, opts, script_args: list, floor_meter: Floor, floor_before: float) -> None:
    """Wall time of ``accelerate launch train_scripts/train_fd_onestep.py`` between two floor measurements."""
    command = ["accelerate", "launch", str(SCRIPT), "--output_dir", opts.output_dir, *script_args]
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    floor_after = floor_meter.best()
    floor = min(floor_before, floor_after)
    floor_total = floor * args.max_train_steps
    summary = json.loads(Path(opts.output_dir, "fd_onestep_summary.json").read_text())
    # the main job's speed target is stated against 1,000 steps' floor, whatever the steps of the run
    floor_1000 = floor * REFERENCE_STEPS
    print(f"\n| the README command ({args.max_train_steps} steps) | seconds | / floor x {args.max_train_steps} steps "
          f"| / floor x {REFERENCE_STEPS} steps |")
    print("|---|---:|---:|---:|")
    for what, sec in (("wall time, end to end", wall),
                      ("of which the training loop (steps, validations, checkpoints)", summary["train_seconds"])):
        print(f"| {what} | {sec:.1f} | {sec / floor_total:.2f}x | {sec / floor_1000:.2f}x |")
    print(f"\nfloor: {floor_before:.4f} s per step before the run, {floor_after:.4f} after (the smaller is used)")
    record = {
        "command": command, "wall_seconds": wall, "train_loop_seconds": summary["train_seconds"],
        "floor_step_seconds": floor, "floor_step_seconds_before": floor_before, "floor_step_seconds_after": floor_after,
        "floor_total_seconds": floor_total, "wall_over_floor": wall / floor_total,
        "wall_over_floor_of_reference_steps": wall / floor_1000, "reference_steps": REFERENCE_STEPS,
        "max_train_steps": args.max_train_steps, "threads": torch.get_num_threads(),
    }
    for path in (Path(opts.output_dir, "end_to_end.json"), opts.record):
        if path:
            write_record(record, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="The training run's output dir (and profile.json).")
    parser.add_argument("--quick", action="store_true", help="20 steps and small sample counts: a smoke run.")
    parser.add_argument("--end_to_end", action="store_true",
                        help="Time the README command (accelerate launch, in a child process) instead of main().")
    parser.add_argument("--record", default=None,
                        help="Where the run record goes (default: results/main_job_profile.json, with --end_to_end "
                             "results/main_job_end_to_end.json; none with --quick).")
    parser.add_argument("script_args", nargs="*", help="Further arguments for the training script (after --).")
    opts = parser.parse_args(argv)
    if opts.record is None and not opts.quick:
        opts.record = RESULTS_DIR / ("main_job_end_to_end.json" if opts.end_to_end else "main_job_profile.json")
    quick = ["--max_train_steps", "20", "--validation_steps", "10", "--num_validation_samples", "64",
             "--fd_warmup_samples", "128", "--num_output_samples", "16", "--num_comparison_samples", "64",
             "--checkpointing_steps", "10"] if opts.quick else []

    script = load_script()
    args = script.parse_args(["--output_dir", opts.output_dir, "--report_to", "none", *quick, *opts.script_args])
    if not args.embedded_default:
        raise SystemExit("profile_main_job.py profiles the offline embedded default: give no model arguments.")
    floor = Floor(script, args)
    floor_before = floor.best()
    if opts.end_to_end:
        end_to_end(script, args, opts, [*quick, *opts.script_args], floor, floor_before)
        return
    profile = Profile()
    probes: list[float] = []
    instrument(script, profile, probe=lambda: probes.append(floor.block()))
    start = time.perf_counter()
    script.main(args)
    accounted = profile.total()
    job = time.perf_counter() - start - profile.seconds[PROBE]
    floor_after = floor.best()
    best = min(floor_before, floor_after)
    # The machine's speed drifts by more than the job's overheads: the interleaved blocks sample the floor
    # across the job's whole time, the before / after ones only at its two ends
    interleaved = statistics.fmean(probes) if probes else None
    floors = {"best of 3 x 10, before / after the job (the smaller)": best}
    if interleaved is not None:
        floors[f"interleaved: mean of {len(probes)} blocks of 10, one before each validation"] = interleaved

    rows = sorted(((k, v) for k, v in profile.seconds.items() if k != PROBE), key=lambda kv: -kv[1])
    print(f"\nmain job: {args.max_train_steps} steps at batch {args.train_batch_size}, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}\n")
    print("| part | seconds | share |")
    print("|---|---:|---:|")
    for name, sec in rows:
        print(f"| {name} | {sec:.1f} | {sec / accounted:.1%} |")
    print(f"| **whole job** | **{job:.1f}** | 100% |")
    steps = sum(profile.seconds[k] for k in (STEP, *STEP_PARTS))
    print(f"\nfloor: denoiser + {len(args.encoders)} training encoders, forward + backward; {floor_before:.4f} s per "
          f"step before the job, {floor_after:.4f} after (best of 3 x 10)"
          + (f"; interleaved blocks {min(probes):.4f}-{max(probes):.4f}" if probes else ""))
    print(f"\n| floor | s per step | training steps ({steps:.1f} s) / floor x {args.max_train_steps} | whole job "
          f"({job:.1f} s) / floor x {REFERENCE_STEPS} |")
    print("|---|---:|---:|---:|")
    for what, sec in floors.items():
        print(f"| {what} | {sec:.4f} | {steps / (sec * args.max_train_steps):.2f}x | "
              f"{job / (sec * REFERENCE_STEPS):.2f}x |")
    record = {
        "parts_seconds": dict(rows), "calls": dict(profile.calls), "job_seconds": job,
        "training_steps_seconds": steps, "floor_step_seconds": best,
        "floor_step_seconds_before": floor_before, "floor_step_seconds_after": floor_after,
        "floor_total_seconds": best * args.max_train_steps, "floor_probe_seconds": probes,
        "floor_interleaved_step_seconds": interleaved,
        "job_over_floor": job / (best * args.max_train_steps), "steps_over_floor": steps / (best * args.max_train_steps),
        "job_over_floor_of_reference_steps": job / (best * REFERENCE_STEPS),
        "job_over_interleaved_floor_of_reference_steps": job / (interleaved * REFERENCE_STEPS) if probes else None,
        "steps_over_interleaved_floor": steps / (interleaved * args.max_train_steps) if probes else None,
        "reference_steps": REFERENCE_STEPS, "max_train_steps": args.max_train_steps, "threads": torch.get_num_threads(),
    }
    for path in (Path(opts.output_dir, "profile.json"), opts.record):
        if path:
            write_record(record, path)


if __name__ == "__main__":
    main()
