"""The model card of a trained one-step pipeline: ``model_card_template.md`` rendered through huggingface_hub."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MODEL_CARD_TEMPLATE", "render_model_card", "check_model_card"]

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "model_card_template.md"
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
