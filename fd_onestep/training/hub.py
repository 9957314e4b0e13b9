"""Publishing a finished output dir to the Hugging Face Hub (early checks, upload without training state)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fd_onestep.errors import RunError
from fd_onestep.training.checkpoints import CHECKPOINT_PREFIX

logger = logging.getLogger(__name__)

__all__ = ["HUB_IGNORE_PATTERNS", "resolve_hub_token", "check_push_to_hub", "push_folder_to_hub"]

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

    Raises ``RunError`` (a ``RuntimeError``) when the Hub is switched off (``HF_HUB_OFFLINE``) and ``ValueError`` when no token
    is available, each naming the fix. The repo id defaults to the output dir's name (under the token's user).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise RunError(
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
