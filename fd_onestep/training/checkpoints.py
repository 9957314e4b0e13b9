"""Resumable checkpoints: ``accelerator.save_state`` folders that only ever appear complete.

A checkpoint is written under a temporary name and renamed into place (``os.replace``) once complete, with a
completion marker; :func:`latest_checkpoint` only ever sees complete ones, so a save interrupted by a crash
or preemption is never resumed from. The marker lists every file of the checkpoint with its size:
:func:`checkpoint_problem` finds a file deleted or truncated since, and ``latest`` falls back to the newest
checkpoint without one (saying which it skipped and why).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_PREFIX",
    "CHECKPOINT_MARKER",
    "checkpoint_step",
    "list_checkpoints",
    "list_partial_checkpoints",
    "latest_checkpoint",
    "checkpoint_problem",
    "resolve_resume_checkpoint",
    "save_checkpoint_atomically",
    "prune_checkpoints",
    "set_aside_newer_checkpoints",
    "note_finished_run",
    "SUPERSEDED_DIR",
]

CHECKPOINT_PREFIX = "checkpoint-"
# Written last into a checkpoint folder, before the atomic rename: its presence means "complete".
CHECKPOINT_MARKER = "fd_onestep_checkpoint.json"
_PARTIAL_SUFFIX = ".partial"
# Checkpoints newer than the one a run resumes from are moved here, not rewritten: the resumed run writes its own.
SUPERSEDED_DIR = "superseded"
_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """Training step of a ``checkpoint-<step>`` folder name, or None for any other name."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / CHECKPOINT_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (``checkpoint-<step>`` with the completion marker) under output_dir, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if checkpoint_step(p) is not None and _is_complete(p)]
    return [p for _, p in sorted(found)]


def list_partial_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Leftovers of interrupted saves: temporary ``.checkpoint-*.partial`` folders and unmarked ``checkpoint-*``."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    partial = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(f".{CHECKPOINT_PREFIX}") and p.name.endswith(_PARTIAL_SUFFIX):
            partial.append(p)
        elif checkpoint_step(p) is not None and p.is_dir() and not _is_complete(p):
            partial.append(p)
    return sorted(partial)


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != CHECKPOINT_MARKER}


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the complete checkpoint ``path`` cannot be loaded, naming the file (None when it looks loadable).

    Checks the files its marker lists (present; the size written, for files other than safetensors) and that
    every safetensors file's header reads and covers the file; no tensor is loaded.
    """
    from safetensors import safe_open

    path = Path(path)
    marker = path / CHECKPOINT_MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        return f"its completion marker {marker} cannot be read ({err})"
    for name, size in (info.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        # a safetensors file says itself whether it is whole (below); others (optimizer.bin, ...) by their size
        if file.suffix != ".safetensors" and file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes where {size} were written (truncated or overwritten)"
    for file in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors' own error type for a damaged header
            return f"{file} cannot be read as safetensors ({err})"
    return None


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None. Partial saves are never returned."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """Checkpoint folder to resume from, resolved before anything is trained.

    ``None`` -> no resume. ``"latest"`` -> the newest complete checkpoint in output_dir that has no
    :func:`checkpoint_problem` (damaged newer ones are skipped with a warning naming them and why), or None when
    there is none (so that ``--resume_from_checkpoint latest`` can always be passed to a preemptible job); only
    damaged ones raise :class:`~fd_onestep.errors.RunError`. Any other value is a path (absolute, or a
    checkpoint name inside output_dir) that must be a complete checkpoint: a missing or partial one raises
    ``FileNotFoundError`` naming what was found instead, a damaged one ``RunError`` naming the file.
    """
    from fd_onestep.errors import RunError

    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        skipped = []
        for candidate in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(candidate)
            if problem is None:
                if skipped:
                    logger.warning("--resume_from_checkpoint latest: skipped damaged %s; resuming from %s.",
                                   "; ".join(f"{p.name} ({why})" for p, why in skipped), candidate.name)
                _note_interrupted_saves(output_dir, candidate)
                return candidate
            skipped.append((candidate, problem))
        if skipped:
            raise RunError(
                f"--resume_from_checkpoint latest: every checkpoint in {str(output_dir)!r} is damaged: "
                + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                + ". Restore one, or start over with --overwrite_output_dir."
            )
        latest = None
        partial = list_partial_checkpoints(output_dir)
        if latest is None and partial:
            logger.warning(
                "--resume_from_checkpoint latest: only interrupted (incomplete) saves in %s, ignored: %s. "
                "Starting a new run.",
                output_dir,
                [p.name for p in partial],
            )
        return latest
    candidate = Path(resume_from_checkpoint)
    if not candidate.exists() and not candidate.is_absolute():
        candidate = Path(output_dir) / resume_from_checkpoint
    if not candidate.is_dir():
        available = [p.name for p in list_checkpoints(output_dir)]
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r}: no such checkpoint folder (looked at "
            f"{resume_from_checkpoint!r} and {str(Path(output_dir) / resume_from_checkpoint)!r}). "
            f"Complete checkpoints in {output_dir}: {available or 'none'}. Pass one of those, 'latest', "
            "or drop the argument to start a new run."
        )
    if not _is_complete(candidate):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {str(candidate)!r} is not a complete fd-onestep checkpoint (no "
            f"{CHECKPOINT_MARKER}: an interrupted save, or a folder written by another tool). Resume from a "
            "complete checkpoint ('latest' picks the newest complete one)."
        )
    problem = checkpoint_problem(candidate)
    if problem is not None:
        raise RunError(
            f"--resume_from_checkpoint {str(candidate)!r} is damaged: {problem}. Resume from another checkpoint "
            "('latest' picks the newest loadable one), or restore this one."
        )
    return candidate


_slow_write = {"seconds": 0.0}


def slow_down_checkpoint_writes(seconds: float) -> None:
    """Tests only: every following checkpoint write takes ``seconds`` longer (between the state and the completion
    marker), as a real model's does (fd_onestep.training.preemption sets it for a stop checkpoint)."""
    _slow_write["seconds"] = float(seconds)


def _note_interrupted_saves(output_dir, resumed: Path) -> None:
    """Name the saves newer than ``resumed`` that never completed (a process killed while writing: a launcher's
    grace shorter than the checkpoint, docs/training.md)."""
    newer = []
    for path in list_partial_checkpoints(output_dir):
        match = re.search(r"(\d+)", path.name)
        if match and int(match.group(1)) > checkpoint_step(resumed):
            newer.append(path.name)
    if newer:
        logger.warning("--resume_from_checkpoint latest: %s never completed (the process was stopped while writing "
                       "it, e.g. killed by its launcher after SIGTERM); resuming from %s, the newest complete "
                       "checkpoint.", ", ".join(newer), resumed.name)


def save_checkpoint_atomically(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """``accelerator.save_state`` into ``output_dir/checkpoint-<step>``, atomically. Call on every process.

    The state is written to ``output_dir/.checkpoint-<step>.partial``; once every process has finished, the
    main process writes the completion marker (step + ``metadata``, JSON) and renames the folder into place
    with ``os.replace``. An existing checkpoint of the same step is replaced only after the new one is
    complete. A crash at any point leaves either the old state or the new complete one, never a folder that
    :func:`latest_checkpoint` would pick.
    """
    import time

    started = time.perf_counter()
    root = Path(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    partial = root / f".{CHECKPOINT_PREFIX}{step}{_PARTIAL_SUFFIX}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if _slow_write["seconds"]:  # tests only: a real model's checkpoint takes seconds to minutes
        time.sleep(_slow_write["seconds"])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # write_seconds: how long a stop checkpoint will take (fd_onestep.training.preemption)
        marker = {"step": int(step), **dict(metadata or {}), "files": _file_sizes(partial),
                  "write_seconds": round(time.perf_counter() - started, 3)}
        with open(partial / CHECKPOINT_MARKER, "w") as f:
            json.dump(marker, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            # Move the old one aside first: os.replace cannot overwrite a non-empty directory.
            trash = root / f".{CHECKPOINT_PREFIX}{step}.old"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(final, trash)
            os.replace(partial, final)
            shutil.rmtree(trash)
        else:
            os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None, protect: Iterable[Path] = ()) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most ``total_limit`` remain; return the deleted ones.

    Called after a new checkpoint is complete (never before: nothing is lost if the new save fails).
    ``protect``: folders never deleted (e.g. the checkpoint being resumed from in this process).
    ``total_limit=None`` keeps everything.
    """
    if total_limit is None:
        return []
    if total_limit < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1 (got {total_limit}); omit it to keep all checkpoints.")
    protected = {Path(p).resolve() for p in protect}
    checkpoints = list_checkpoints(output_dir)
    removable = [p for p in checkpoints if p.resolve() not in protected]
    excess = len(checkpoints) - total_limit
    removed = []
    for path in removable[: max(excess, 0)]:
        shutil.rmtree(path)
        removed.append(path)
    if removed:
        logger.info("checkpoints_total_limit=%d: removed %s", total_limit, ", ".join(p.name for p in removed))
    return removed


def set_aside_newer_checkpoints(output_dir: str | os.PathLike, resume_path: str | os.PathLike | None) -> list[Path]:
    """Resuming from an older checkpoint: move the complete checkpoints of later steps to
    ``output_dir/superseded/<resumed name>/`` (call on the main process) and warn naming them, so that the
    resumed run's own checkpoints of those steps replace nothing. Returns their new paths."""
    if resume_path is None or checkpoint_step(resume_path) is None:
        return []
    step = checkpoint_step(resume_path)
    newer = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) > step]
    if not newer:
        return []
    target = Path(output_dir) / SUPERSEDED_DIR / f"after-{Path(resume_path).name}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = Path(output_dir) / SUPERSEDED_DIR / f"after-{Path(resume_path).name}-{suffix}"
    target.mkdir(parents=True)
    moved = []
    for path in newer:
        os.replace(path, target / path.name)
        moved.append(target / path.name)
    logger.warning(
        "resuming from %s, older than %s: those were moved to %s (kept, not rewritten; 'latest' no longer picks "
        "them). Delete them if the resumed run replaces them, or move one back to resume from it.",
        Path(resume_path).name, ", ".join(p.name for p in newer), target,
    )
    return moved


def note_finished_run(resumed_step: int, max_train_steps: int, resume_path: str | os.PathLike) -> bool:
    """Say in one line when a resumed checkpoint is already at the run's last step (nothing left to train: the
    final outputs are written again from it). Returns whether it is."""
    if resumed_step < max_train_steps:
        return False
    logger.warning(
        "%s is at step %d, the run's last (--max_train_steps %d): nothing left to train; writing the final outputs "
        "(weights, validation, samples, model card) again from it. Raise --max_train_steps to train on.",
        Path(resume_path).name, resumed_step, max_train_steps,
    )
    return True
