"""Library support for ``train_scripts/train_fd_onestep.py``: checkpoints, run fingerprints, Hub push, model card.

Everything here is independent of the model family, so it is tested without training anything:

- checkpoints are ``accelerator.save_state`` folders written under a temporary name and renamed into place
  (``os.replace``) only once complete, with a completion marker; :func:`latest_checkpoint` only ever sees
  complete ones, so a save interrupted by a crash or preemption is never resumed from;
- the *run fingerprint* is the subset of arguments that changes what a run computes; it is saved in the
  output dir and in every checkpoint, and an output dir holding another run's checkpoints is an early error;
- ``--hub_token`` is a secret: it is stripped from everything saved or logged (:data:`SECRET_ARGS`);
- extra training state (FD populations, generator EMA, sampling RNG, step counter) is saved as safetensors
  (tensors) plus JSON (scalars), never pickled, so loading a checkpoint never executes code;
- the model card is rendered from ``model_card_template.md`` through huggingface_hub's ``ModelCard``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_PREFIX",
    "CHECKPOINT_MARKER",
    "RUN_ARGS_FILE",
    "SECRET_ARGS",
    "NON_FINGERPRINT_ARGS",
    "MODEL_CARD_TEMPLATE",
    "checkpoint_step",
    "list_checkpoints",
    "list_partial_checkpoints",
    "latest_checkpoint",
    "resolve_resume_checkpoint",
    "save_checkpoint_atomically",
    "prune_checkpoints",
    "public_args",
    "run_fingerprint",
    "fingerprint_digest",
    "write_run_args",
    "check_output_dir_compatible",
    "check_checkpoint_compatible",
    "flatten_state",
    "unflatten_state",
    "save_state_file",
    "load_state_file",
    "CheckpointableGenerator",
    "TrainingProgress",
    "resolve_hub_token",
    "check_push_to_hub",
    "push_folder_to_hub",
    "HUB_IGNORE_PATTERNS",
    "render_model_card",
    "check_model_card",
    "parse_name_list",
    "parse_float_list",
]

CHECKPOINT_PREFIX = "checkpoint-"
# Written last into a checkpoint folder, before the atomic rename: its presence means "complete".
CHECKPOINT_MARKER = "fd_onestep_checkpoint.json"
# Saved in the output dir (and in each checkpoint): the run's arguments without secrets, and its fingerprint.
RUN_ARGS_FILE = "fd_onestep_run_args.json"
_PARTIAL_SUFFIX = ".partial"
_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_card_template.md"

# Never written to disk, logs or trackers.
SECRET_ARGS = frozenset({"hub_token"})

# Arguments that do not change what a run computes (where it writes, how often it reports or saves, how it
# publishes). Everything else is in the fingerprint: resuming or writing into an output dir whose checkpoints
# were made with different values is an error, because the continuation would silently be another run.
NON_FINGERPRINT_ARGS = frozenset(
    {
        "output_dir",
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
    }
)

# lr schedules that do not depend on the total number of steps: for those, --max_train_steps may be raised
# when resuming (a run is extended, not changed).
_STEP_INDEPENDENT_SCHEDULERS = frozenset({"constant", "constant_with_warmup"})


# ----------------------------------------------------------------------------------------------- checkpoints
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


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None. Partial saves are never returned."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """Checkpoint folder to resume from, resolved before anything is trained.

    ``None`` -> no resume. ``"latest"`` -> the newest complete checkpoint in output_dir, or None when there is
    none (so that ``--resume_from_checkpoint latest`` can always be passed to a preemptible job). Any other
    value is a path (absolute, or a checkpoint name inside output_dir) that must be a complete checkpoint:
    a missing or partial one raises ``FileNotFoundError`` naming what was found instead.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        latest = latest_checkpoint(output_dir)
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
    return candidate


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
    root = Path(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    partial = root / f".{CHECKPOINT_PREFIX}{step}{_PARTIAL_SUFFIX}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = {"step": int(step), **dict(metadata or {})}
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


# ----------------------------------------------------------------------------------------- run fingerprint
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


def run_fingerprint(args, num_processes: int = 1) -> dict[str, Any]:
    """Arguments that change what the run computes (see :data:`NON_FINGERPRINT_ARGS` for the others).

    The number of processes is included because the global batch is ``num_processes * train_batch_size``.
    ``max_train_steps`` is left out for lr schedules that do not depend on it, so such a run may be extended.
    """
    fingerprint = {k: v for k, v in public_args(args).items() if k not in NON_FINGERPRINT_ARGS}
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


def _fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"--{k}: {saved.get(k, '<unset>')!r} (saved) vs {current.get(k, '<unset>')!r} (now)"
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
            f"{RUN_ARGS_FILE}, so they cannot be attributed to this run. Use a fresh --output_dir, or delete "
            "those checkpoints."
        )
    differences = _saved_fingerprint_differences(run_file, fingerprint)
    if differences:
        raise ValueError(
            f"--output_dir {str(root)!r} holds checkpoints of another run ({', '.join(p.name for p in checkpoints)}) "
            "made with different arguments:\n  "
            + "\n  ".join(differences)
            + "\nUse a fresh --output_dir for the new arguments, or rerun with that run's arguments to resume it "
            "(--resume_from_checkpoint latest)."
        )


# ------------------------------------------------------------------------------------ training state files
def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tensors, JSON scalars) into tensors and a JSON skeleton.

    Returns ``(tensors, skeleton)``: ``tensors`` maps dotted keys to contiguous CPU tensors; the skeleton is
    the same structure with each tensor replaced by ``{"__tensor__": key}``. Raises ``TypeError`` for any
    other leaf type (no pickling).
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, key):
        if isinstance(node, torch.Tensor):
            tensors[key] = node.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(node, Mapping):
            out = {}
            for k, v in node.items():
                if not isinstance(k, (str, int)):
                    raise TypeError(f"state key {k!r} at {key!r} is not a str or int")
                out[str(k)] = walk(v, f"{key}.{k}" if key else str(k))
            if any(isinstance(k, int) for k in node):
                out = {"__intkeys__": out}
            return out
        if isinstance(node, (list, tuple)):
            return {"__list__": [walk(v, f"{key}.{i}" if key else str(i)) for i, v in enumerate(node)]}
        if isinstance(node, bool) or node is None or isinstance(node, (int, str)):
            return node
        if isinstance(node, float):
            if not math.isfinite(node):
                return {"__float__": repr(node)}
            return node
        raise TypeError(
            f"state entry {key!r} has type {type(node).__name__}; training state must be tensors, dicts, lists "
            "and JSON scalars so that it is saved without pickle."
        )

    skeleton = walk(state, prefix)
    return tensors, skeleton


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_state`."""

    def walk(node):
        if isinstance(node, dict):
            if set(node) == {"__tensor__"}:
                return tensors[node["__tensor__"]]
            if set(node) == {"__list__"}:
                return [walk(v) for v in node["__list__"]]
            if set(node) == {"__float__"}:
                return float(node["__float__"])
            if set(node) == {"__intkeys__"}:
                return {(int(k) if k.lstrip("-").isdigit() else k): walk(v) for k, v in node["__intkeys__"].items()}
            return {k: walk(v) for k, v in node.items()}
        return node

    return walk(skeleton)


def save_state_file(state: Any, path: str | os.PathLike) -> None:
    """Save a nested training state to ``path`` (safetensors; the structure as JSON in its metadata)."""
    from safetensors.torch import save_file

    tensors, skeleton = flatten_state(state)
    save_file(tensors, str(path), metadata={"fd_onestep_state": json.dumps(skeleton)})


def load_state_file(path: str | os.PathLike) -> Any:
    """Load a state written by :func:`save_state_file` (no pickle involved)."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        skeleton = json.loads(f.metadata()["fd_onestep_state"])
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return unflatten_state(tensors, skeleton)


class CheckpointableGenerator:
    """A seeded ``torch.Generator`` for noise / conditioning sampling, with ``state_dict``/``load_state_dict``.

    Every process holds the same generator and draws the *global* batch, then keeps its own slice: the
    samples a run sees then do not depend on the number of processes (N processes with batch b draw exactly
    what one process with batch N*b draws), and resuming restores the stream exactly.
    """

    def __init__(self, seed: int, device: str | torch.device = "cpu"):
        self.seed = int(seed)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng_state": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["rng_state"].to(torch.uint8).cpu())


class TrainingProgress:
    """Step counter and best fresh-sample metric, saved with every checkpoint (no dataloader to count with)."""

    def __init__(self):
        self.global_step = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": int(self.global_step),
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.best_metric = state.get("best_metric")
        self.best_step = state.get("best_step")
        self.history = [dict(h) for h in state.get("history", [])]


# ------------------------------------------------------------------------------------------------------ Hub
# Never uploaded: resumable training state and scratch files (the pipeline, card, samples and logs are).
HUB_IGNORE_PATTERNS = [
    f"{CHECKPOINT_PREFIX}*",
    f"{CHECKPOINT_PREFIX}*/**",
    f".{CHECKPOINT_PREFIX}*",
    f".{CHECKPOINT_PREFIX}*/**",
    "step_*",
    "epoch_*",
    "*.partial",
    "*.partial/**",
    "debug_*",
]


def resolve_hub_token(hub_token: str | None) -> str | None:
    """The token to push with: ``--hub_token`` if given (with a warning), else the one from ``hf auth login``
    or the ``HF_TOKEN`` environment variable, else None."""
    if hub_token:
        logger.warning(
            "--hub_token on the command line ends up in shell history and process listings; prefer "
            "`hf auth login` (or the HF_TOKEN environment variable). The token is never logged nor saved."
        )
        return hub_token
    from huggingface_hub import get_token

    return get_token()


def check_push_to_hub(hub_token: str | None, hub_model_id: str | None, output_dir: str | os.PathLike) -> tuple[str, str]:
    """Early checks for ``--push_to_hub`` (before any training). Returns ``(repo_id, token)``.

    Raises ``RuntimeError`` when the Hub is switched off (``HF_HUB_OFFLINE``) and ``ValueError`` when no token
    is available, each naming the fix. The repo id defaults to the output dir's name (under the token's user).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(
            "--push_to_hub was given but the Hub is offline (HF_HUB_OFFLINE is set): the upload at the end "
            "would fail after training. Unset HF_HUB_OFFLINE on a machine with network access, or drop "
            "--push_to_hub and upload the output dir later with `hf upload`."
        )
    token = resolve_hub_token(hub_token)
    if not token:
        raise ValueError(
            "--push_to_hub needs a Hugging Face token with write access, and none was found. Run "
            "`hf auth login` (or set HF_TOKEN) before training, or drop --push_to_hub."
        )
    repo_id = hub_model_id or Path(output_dir).resolve().name
    if not repo_id or repo_id.count("/") > 1:
        raise ValueError(f"--hub_model_id {repo_id!r} is not a repo id: use 'name' or 'user_or_org/name'.")
    return repo_id, token


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str,
    *,
    private: bool | None = None,
    commit_message: str = "Upload FD-loss one-step pipeline",
):
    """``create_repo`` (exist_ok) then ``upload_folder`` of the output dir, without checkpoints. Returns the commit info."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id=repo_id, exist_ok=True, private=private, repo_type="model").repo_id
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        ignore_patterns=HUB_IGNORE_PATTERNS,
        repo_type="model",
    )


# ------------------------------------------------------------------------------------------------ model card
_PLACEHOLDER_RE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)


def render_model_card(
    *,
    base_model: str,
    model_family: str,
    encoders: list[dict[str, Any]],
    eval_encoders: list[dict[str, Any]] | None = None,
    training: Mapping[str, Any],
    final_fds: list[dict[str, Any]] | None = None,
    sample_grid: str | None = None,
    repo_id: str | None = None,
    lora: bool = False,
    conditioning: str = "unconditional",
    example_call: str | None = None,
    template_path: str | os.PathLike | None = None,
    license: str = "other",
):
    """Render ``model_card_template.md`` into a ``huggingface_hub.ModelCard``.

    ``encoders`` / ``eval_encoders``: dicts with ``name``, ``encoder_id``, ``feature_dim``, ``stats`` (the
    reference-stats source) and optionally ``weight``, ``num_samples``, ``dataset``. ``final_fds``: dicts with
    ``encoder``, ``population_fd`` (or None), ``fresh_fd``, ``fd_r`` (or None), ``in_loss`` (bool).
    ``training``: steps, global batch, processes, learning rate, schedule, population mode, ... (rendered
    as a table). Raises ``ValueError`` if a template placeholder is left over (see :func:`check_model_card`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    tags = ["diffusers", "fd-onestep", "one-step", "frechet-distance", "text-to-image" if conditioning == "text" else "image-generation"]
    if lora:
        tags.append("lora")
    card_data = ModelCardData(
        license=license,
        library_name="diffusers",
        base_model=base_model if _looks_like_hub_id(base_model) else None,
        pipeline_tag="text-to-image" if conditioning == "text" else "unconditional-image-generation",
        tags=tags,
    )
    repo_id = repo_id or "path/to/this-folder"
    if example_call is None:
        example_call = {
            "text": 'pipe("a photo of a cat").images[0]',
            "class": "pipe(class_labels=[0, 1, 2, 3]).images",
        }.get(conditioning, "pipe(batch_size=4).images")
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or MODEL_CARD_TEMPLATE),
        base_model=base_model,
        model_family=model_family,
        encoders=encoders,
        eval_encoders=eval_encoders or [],
        training=dict(training),
        final_fds=final_fds or [],
        sample_grid=sample_grid,
        repo_id=repo_id,
        lora=lora,
        conditioning=conditioning,
        example_call=example_call,
    )
    check_model_card(card)
    return card


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name or "")) and not os.path.exists(name)


def check_model_card(card) -> None:
    """Offline checks of a rendered card; raises ``ValueError`` naming the problem.

    ``ModelCard.validate()`` posts the card to the Hub's ``/api/validate-yaml`` endpoint (network), so it is
    called at push time; here we check what can be checked locally: the card re-parses through
    ``ModelCard`` with a metadata dict, ``library_name`` is diffusers, and no Jinja placeholder
    (``{{ }}``, ``{% %}``, ``{# #}``) is left in the text.
    """
    from huggingface_hub import ModelCard

    text = str(card)
    leftovers = _PLACEHOLDER_RE.findall(text)
    if leftovers:
        raise ValueError(f"model card has unrendered template placeholders: {leftovers[:5]}; fix model_card_template.md.")
    reparsed = ModelCard(text)
    metadata = reparsed.data.to_dict()
    if metadata.get("library_name") != "diffusers":
        raise ValueError(f"model card metadata must set library_name: diffusers (got {metadata.get('library_name')!r}).")
    if not reparsed.text.strip():
        raise ValueError("model card has an empty body.")


# --------------------------------------------------------------------------------------- argument helpers
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
