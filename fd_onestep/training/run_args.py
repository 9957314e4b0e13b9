"""The run's arguments as saved and compared: secrets stripped, the run fingerprint, argparse list helpers.

The *run fingerprint* is the subset of arguments that changes what a run computes; it is saved in the output
dir and in every checkpoint, and an output dir holding another run's checkpoints is an early error. Input files
(prompts, statistics, a class histogram) enter it by content (sha256), a caption dataset by its ``datasets``
fingerprint: the same file under another path resumes, a file changed in place does not.
``--hub_token`` is a secret: it is stripped from everything saved or logged (:data:`SECRET_ARGS`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fd_onestep.training.checkpoints import list_checkpoints

__all__ = [
    "RUN_ARGS_FILE",
    "SECRET_ARGS",
    "NON_FINGERPRINT_ARGS",
    "public_args",
    "CONTENT_ARGS",
    "file_digest",
    "run_fingerprint",
    "fingerprint_digest",
    "write_run_args",
    "check_output_dir_compatible",
    "check_checkpoint_compatible",
    "parse_name_list",
    "parse_float_list",
]

# Saved in the output dir (and in each checkpoint): the run's arguments without secrets, and its fingerprint.
RUN_ARGS_FILE = "fd_onestep_run_args.json"

# Never written to disk, logs or trackers.
SECRET_ARGS = frozenset({"hub_token"})

# Arguments that do not change what a run computes (where it writes, how often it reports or saves, how it
# publishes). Everything else is in the fingerprint: resuming or writing into an output dir whose checkpoints
# were made with different values is an error, because the continuation would silently be another run.
NON_FINGERPRINT_ARGS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "logging_dir",
        "report_to",
        "tracker_project_name",
        "resume_from_checkpoint",
        "stop_after_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "num_validation_images",
        "num_validation_samples",
        "validation_batch_size",
        "eval_encoders",
        "eval_reference_stats",
        "keep_best_by",
        "final_weights",
        "push_to_hub",
        "hub_model_id",
        "hub_token",
        "hub_private_repo",
        "compare_with_teacher",
        "num_comparison_samples",
        "num_output_samples",
        "debug_dump_first_step_grad",
        "dataloader_num_workers",
        "local_rank",
        "allow_tf32",
        "encoder_batch_size",
        "sample_batch_size",
        "fresh_fd_warning_ratio",
        "tqdm_disable",
        "cache_dir",
        "local_files_only",
        "inception_weights",
        "num_cpu_threads",
        "adam_fused",  # like the thread count: the same update, another float round-off
        # the config files and the values they set are in the fingerprint as the arguments they became
        "config",
        "config_values",
        "show_config",
        "plan",
        "gpu_memory_gb",
    }
)

# lr schedules that do not depend on the total number of steps: for those, --max_train_steps may be raised
# when resuming (a run is extended, not changed).
_STEP_INDEPENDENT_SCHEDULERS = frozenset({"constant", "constant_with_warmup"})

# File arguments compared by content, not by path spelling (see :func:`run_fingerprint`).
CONTENT_ARGS = ("prompts_file", "reference_stats", "class_reference_stats", "class_histogram")
_DIGEST_PREFIX = "sha256:"


def file_digest(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return _DIGEST_PREFIX + digest.hexdigest()


def _content(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_content(v) for v in value]
    return file_digest(value) if Path(value).is_file() else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def public_args(args) -> dict[str, Any]:
    """The run's arguments as a JSON-able dict without secrets (``--hub_token`` is removed, not masked)."""
    values = vars(args) if not isinstance(args, Mapping) else dict(args)
    return {k: _jsonable(v) for k, v in sorted(values.items()) if k not in SECRET_ARGS and not k.startswith("_")}


def run_fingerprint(args, num_processes: int = 1, dataset_fingerprint: str | None = None) -> dict[str, Any]:
    """Arguments that change what the run computes (see :data:`NON_FINGERPRINT_ARGS` for the others).

    The number of processes is included because the global batch is ``num_processes * train_batch_size``.
    ``max_train_steps`` is left out for lr schedules that do not depend on it, so such a run may be extended.
    The files of :data:`CONTENT_ARGS` are replaced by their :func:`file_digest`; ``dataset_fingerprint`` (the
    caption dataset's ``Dataset._fingerprint``) is added under ``dataset_fingerprint``.
    """
    fingerprint = {k: v for k, v in public_args(args).items() if k not in NON_FINGERPRINT_ARGS}
    for key in CONTENT_ARGS:
        if key in fingerprint:
            fingerprint[key] = _content(fingerprint[key])
    if dataset_fingerprint is not None:
        fingerprint["dataset_fingerprint"] = str(dataset_fingerprint)
    if fingerprint.get("lr_scheduler") in _STEP_INDEPENDENT_SCHEDULERS:
        fingerprint.pop("max_train_steps", None)
    fingerprint["num_processes"] = int(num_processes)
    return fingerprint


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """Short stable hash of a fingerprint (sha256 of its sorted JSON), for checkpoint markers and logs."""
    blob = json.dumps(_jsonable(fingerprint), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_run_args(path: str | os.PathLike, args, fingerprint: Mapping[str, Any]) -> Path:
    """Write ``{"args": public_args(args), "fingerprint": ..., "digest": ...}`` as JSON to ``path`` (a folder or file)."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / RUN_ARGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": public_args(args), "fingerprint": _jsonable(fingerprint), "digest": fingerprint_digest(fingerprint)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def _is_digest(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return any(isinstance(v, str) and v.startswith(_DIGEST_PREFIX) for v in values)


def _difference(key: str, saved: Any, now: Any) -> str:
    if key == "dataset_fingerprint":
        return (f"--dataset_name: the caption dataset's content changed (datasets fingerprint {saved} then, {now} "
                "now)")
    if _is_digest(saved) and _is_digest(now):
        return (f"--{key}: the file's content changed since the checkpoint was written ({saved} then, {now} now; "
                "paths are not compared, contents are)")
    return f"--{key}: {saved!r} (saved) vs {now!r} (now)"


def _fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        _difference(k, saved.get(k, "<unset>"), current.get(k, "<unset>"))
        for k in keys
        if saved.get(k, "<unset>") != current.get(k, "<unset>")
    ]


def _saved_fingerprint_differences(run_file: Path, fingerprint: Mapping[str, Any]) -> list:
    """Differences between the fingerprint saved in ``run_file`` and ``fingerprint`` (empty when equal)."""
    saved = json.loads(run_file.read_text())["fingerprint"]
    return _fingerprint_differences(saved, _jsonable(fingerprint))


def check_checkpoint_compatible(checkpoint: str | os.PathLike, fingerprint: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if a checkpoint was written by a run with a different fingerprint."""
    run_file = Path(checkpoint) / RUN_ARGS_FILE
    if not run_file.is_file():
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} has no {RUN_ARGS_FILE}: it was not written by train_fd_onestep.py, "
            "so resuming from it cannot be checked. Resume from a checkpoint of this script, or start a new run."
        )
    differences = _saved_fingerprint_differences(run_file, fingerprint)
    if differences:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} was written by a run with different arguments:\n  "
            + "\n  ".join(differences)
            + "\nResume with the same arguments as that run, or start a new run in a fresh --output_dir."
        )


def check_output_dir_compatible(output_dir: str | os.PathLike, fingerprint: Mapping[str, Any]) -> None:
    """Early error if ``output_dir`` holds checkpoints of another run (different fingerprint, or none saved).

    An output dir without checkpoints is always fine (a finished pipeline in it is simply overwritten).
    """
    root = Path(output_dir)
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        return
    run_file = root / RUN_ARGS_FILE
    if not run_file.is_file():
        raise ValueError(
            f"--output_dir {str(root)!r} holds checkpoints ({', '.join(p.name for p in checkpoints)}) but no "
            f"{RUN_ARGS_FILE}, so they cannot be attributed to this run. Use a fresh --output_dir, or start over with "
            "--overwrite_output_dir (deletes those checkpoints)."
        )
    differences = _saved_fingerprint_differences(run_file, fingerprint)
    if differences:
        raise ValueError(
            f"--output_dir {str(root)!r} holds checkpoints of another run ({', '.join(p.name for p in checkpoints)}) "
            "made with different arguments:\n  "
            + "\n  ".join(differences)
            + "\nUse a fresh --output_dir for the new arguments, rerun with that run's arguments to resume it "
            "(--resume_from_checkpoint latest), or start over with --overwrite_output_dir (deletes its checkpoints)."
        )


def parse_name_list(value: str | list[str] | None) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (argparse values given with spaces or commas)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def parse_float_list(value: str | list[str] | None, name: str) -> list[float]:
    """Comma/space separated floats; a clear ``ValueError`` naming the argument otherwise."""
    out = []
    for part in parse_name_list(value):
        try:
            out.append(float(part))
        except ValueError:
            raise ValueError(f"--{name}: {part!r} is not a number; pass numbers such as `--{name} 1.0 0.5`.") from None
    return out
