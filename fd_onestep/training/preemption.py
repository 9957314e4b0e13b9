"""Preemption under a launcher: how long the script has between a scheduler's SIGTERM and its SIGKILL, and what a
stop keeps when that is too short.

A scheduler (SLURM, Kubernetes) signals the whole job: the launcher and the script. The training script answers
SIGTERM by finishing its step, writing a checkpoint and exiting (``StopRequest``), but the launcher answers it too:

- ``accelerate launch`` with one process (accelerate's ``simple_launcher``): the launcher terminates its child
  and kills it **5 s** later (``_terminate_process_tree``: ``psutil.wait_procs(timeout=5)``, then ``kill()``);
- ``accelerate launch --multi_gpu`` / ``torchrun`` (torch elastic's agent): the agent sends SIGTERM to every
  rank and kills them **30 s** later (``LocalElasticAgent`` ``shutdown_timeout=30``);
- the script started directly (``python train_scripts/train_fd_onestep.py``, one process): no launcher; the
  scheduler's own grace (SLURM ``KillWait``, Kubernetes ``terminationGracePeriodSeconds``; 30 s by default).

A stop checkpoint that does not fit is killed while being written; checkpoints are atomic, so the newest
complete one stays and ``--resume_from_checkpoint latest`` resumes from it. :func:`before_stop_checkpoint` says
so at the signal, naming that checkpoint, the grace and the last checkpoint's write time (recorded in each
checkpoint's marker); docs/training.md lists the routes and the grace each needs.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# accelerate's simple launcher: psutil.wait_procs(processes, timeout=5) between terminate() and kill()
ACCELERATE_SIMPLE_LAUNCHER_GRACE_S = 5.0
# torch.distributed.elastic LocalElasticAgent(shutdown_timeout=30): SIGTERM to the workers, then SIGKILL
TORCH_ELASTIC_GRACE_S = 30.0
# Tests only: seconds added to a checkpoint written after a stop signal (a real model's checkpoint takes that long).
SLOW_STOP_CHECKPOINT_ENV = "FD_ONESTEP_TEST_STOP_CHECKPOINT_DELAY"


def launcher_grace(parent_pid: int | None = None) -> tuple[str, float | None]:
    """``(launcher, seconds)``: the launcher this process runs under and how long it lets the script run after
    its SIGTERM before killing it; ``seconds`` is None without a launcher (the scheduler's own grace)."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "torch elastic (accelerate launch --multi_gpu / torchrun)", TORCH_ELASTIC_GRACE_S
    try:
        import psutil

        args = psutil.Process(parent_pid or os.getppid()).cmdline()
    except Exception:  # no such process, no permission: no launcher known
        return "none", None
    # `accelerate launch ...` or `python -m accelerate.commands.launch ...`
    cli = "launch" in args and any(os.path.basename(a) == "accelerate" for a in args[:2])
    if cli or "accelerate.commands.launch" in args:
        return "accelerate launch (one process)", ACCELERATE_SIMPLE_LAUNCHER_GRACE_S
    return "none", None


def checkpoint_write_seconds(path: str | os.PathLike) -> float | None:
    """The write time recorded in a checkpoint's completion marker (None for checkpoints from before it was)."""
    import json

    from .checkpoints import CHECKPOINT_MARKER

    try:
        value = json.loads((Path(path) / CHECKPOINT_MARKER).read_text()).get("write_seconds")
    except (OSError, ValueError):
        return None
    return float(value) if value is not None else None


def before_stop_checkpoint(output_dir: str | os.PathLike, step: int, signal_time: float | None = None) -> bool:
    """Called after a stop signal, before the stop checkpoint of ``step`` is written: warn, naming the newest
    complete checkpoint, when the launcher may kill the script before the write ends (the last checkpoint took
    longer than the time left, or its time is unknown). Returns whether it warned."""
    from .checkpoints import latest_checkpoint

    launcher, grace = launcher_grace()
    delay = float(os.environ.get(SLOW_STOP_CHECKPOINT_ENV, "0") or 0)
    warned = False
    if grace is not None:
        newest = latest_checkpoint(output_dir)
        left = grace - (time.time() - signal_time) if signal_time is not None else grace
        took = checkpoint_write_seconds(newest) if newest is not None else None
        if took is None or took + delay >= left:
            kept = (f"{newest.name} is the newest complete checkpoint" if newest is not None
                    else "no checkpoint is written yet")
            logger.warning(
                f"{launcher} kills this process {grace:g} s after its SIGTERM; the last checkpoint took "
                f"{'an unknown time' if took is None else f'{took + delay:.1f} s'} to write, so checkpoint-{step} "
                f"may be cut off: {kept}, and --resume_from_checkpoint latest resumes from it. For preemptible jobs "
                "launch one process with `python train_scripts/train_fd_onestep.py ...` (the scheduler's grace) or "
                "several with `accelerate launch --multi_gpu` (30 s): docs/training.md, preemption."
            )
            warned = True
    if delay > 0:
        from .checkpoints import slow_down_checkpoint_writes

        slow_down_checkpoint_writes(delay)
    return warned
