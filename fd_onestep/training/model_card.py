"""The model card of a trained one-step pipeline: ``model_card_template.md`` (the repository's top-level file; package data through the link next to this module)
rendered through huggingface_hub, and what the card takes from the teacher (its Hub id, its license)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["MODEL_CARD_TEMPLATE", "render_model_card", "check_model_card", "teacher_hub_id", "teacher_license"]

logger = logging.getLogger(__name__)

# Package data (pyproject's package-data), so editable and wheel installs both find it.
MODEL_CARD_TEMPLATE = resources.files(__package__).joinpath("model_card_template.md")
_PLACEHOLDER_RE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)
_LICENSE_FIELDS = ("license", "license_name", "license_link")


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
    license_name: str | None = None,
    license_link: str | None = None,
    base_model_id: str | None = None,
    one_step_settings: Mapping[str, Any] | None = None,
    comparison_grid: str | None = None,
    comparison_table: str | None = None,
    stock_recipe: Mapping[str, Any] | None = None,
    fresh_samples: int | None = None,
    demo_space: Mapping[str, Any] | None = None,
):
    """Render ``model_card_template.md`` into a ``huggingface_hub.ModelCard``.

    ``base_model``: the teacher as the run loaded it (Hub id or local folder); it is what the text names and
    what the LoRA snippet loads. ``base_model_id``: the teacher's Hub id where known for a local teacher
    (:func:`teacher_hub_id`); the metadata field ``base_model`` only ever holds a Hub id. ``license``,
    ``license_name``, ``license_link``: the card's license metadata (:func:`teacher_license` reads the
    teacher's). ``one_step_settings``: the ``FDOneStepPipeline.from_teacher`` keyword arguments the run
    trained with (``fd_onestep_lora.json``'s ``one_step_settings``, plus ``revision`` / ``variant``); required
    with ``lora``, since a LoRA on a base with other settings is another generator.
    ``encoders`` / ``eval_encoders``: dicts with ``name``, ``encoder_id``, ``feature_dim``, ``stats`` (the
    reference-stats source) and optionally ``weight``, ``num_samples``, ``dataset``. ``final_fds``: dicts with
    ``encoder``, ``population_fd`` (or None), ``fresh_fd``, ``fd_r`` (or None), ``in_loss`` (bool); ``fresh_samples``:
    how many generated samples the fresh FDs were measured on. ``demo_space``: the run's Gradio demo
    (``fd_onestep.demo.DemoSpace.card_entry()``: its ``folder`` in the output dir, the Space ``url`` when pushed,
    the ``model_id`` it shows).
    ``training``: steps, global batch, processes, learning rate, schedule, population mode, ... (rendered
    as a table). ``sample_grid`` / ``comparison_grid``: image paths relative to the card; ``comparison_table``:
    the markdown of the run's ``comparison.md``. ``stock_recipe``: a LoRA's stock-pipeline one step
    (``FDOneStepPipeline.stock_one_step()``'s ``pipeline``, the scheduler's class name as ``scheduler``,
    ``scheduler_overrides`` and ``call_kwargs``), shown as a snippet without fd-onestep. Raises ``ValueError`` if a template placeholder is left over
    (see :func:`check_model_card`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from fd_onestep.pipelines.pipeline_fd_onestep import PIPELINE_FILE_NAME

    if lora and one_step_settings is None:
        raise ValueError(
            "a LoRA card needs one_step_settings (the from_teacher arguments the LoRA was trained with: "
            "fd_onestep_lora.json's one_step_settings); without them its snippet builds another generator."
        )
    tags = ["diffusers", "fd-onestep", "one-step", "frechet-distance", "text-to-image" if conditioning == "text" else "image-generation"]
    if lora:
        tags.append("lora")
    base_is_hub_id = _looks_like_hub_id(base_model)
    hub_id = base_model if base_is_hub_id else (base_model_id if _looks_like_hub_id(base_model_id) else None)
    card_data = ModelCardData(
        license=license,
        license_name=license_name,
        license_link=license_link,
        library_name="diffusers",
        base_model=hub_id,
        pipeline_tag="text-to-image" if conditioning == "text" else "unconditional-image-generation",
        tags=tags,
    )
    repo_id = repo_id or "path/to/this-folder"
    if example_call is None:
        example_call = {
            "text": 'pipe("a photo of a cat").images[0]',
            "class": "pipe(class_labels=[0, 1, 2, 3]).images",
        }.get(conditioning, "pipe(batch_size=4).images")
    template = {"template_path": str(template_path)} if template_path else {
        "template_str": MODEL_CARD_TEMPLATE.read_text(encoding="utf-8")}
    card = ModelCard.from_template(
        card_data,
        **template,
        base_model=base_model,
        base_model_origin=None if base_is_hub_id else hub_id,
        base_model_is_local=not base_is_hub_id,
        model_family=model_family,
        encoders=encoders,
        eval_encoders=eval_encoders or [],
        training=dict(training),
        final_fds=final_fds or [],
        fresh_samples=fresh_samples,
        demo_space=dict(demo_space) if demo_space else None,
        sample_grid=sample_grid,
        comparison_grid=comparison_grid,
        comparison_table=(comparison_table or "").strip() or None,
        repo_id=repo_id,
        lora=lora,
        one_step_kwargs=_keywords(one_step_settings or {}),
        pipeline_module=PIPELINE_FILE_NAME.removesuffix(".py"),
        conditioning=conditioning,
        example_call=example_call,
        stock_recipe=None if not stock_recipe else {
            "pipeline": stock_recipe["pipeline"], "scheduler": stock_recipe["scheduler"],
            "overrides": _keywords(stock_recipe.get("scheduler_overrides") or {}),
            "call_kwargs": _keywords(stock_recipe["call_kwargs"]),
        },
    )
    check_model_card(card)
    return card


def _keywords(values: Mapping[str, Any]) -> str:
    """``{"a": 1, "b": "x"}`` -> ``a=1, b='x'``: keyword arguments as Python source."""
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def _looks_like_hub_id(name: str | None) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name or "")) and not os.path.exists(name)


def _hub_id_of_cache_path(path: str) -> str | None:
    """``org/name`` for a path inside the Hub cache (``.../models--org--name/snapshots/<commit>/...``), else None."""
    parts = Path(path).parts
    for folder, below in zip(parts, parts[1:]):
        if folder.startswith("models--") and below == "snapshots":
            return folder[len("models--"):].replace("--", "/")
    return None


def teacher_hub_id(teacher: str | os.PathLike) -> str | None:
    """The Hub id of the teacher, where it is known; None otherwise.

    A Hub id is itself. For a local folder: the id of the Hub cache snapshot it lies in, else the id its
    denoiser's config records as ``_name_or_path`` (diffusers writes where a model was loaded from: a Hub id,
    or a path in the Hub cache when it came with a pipeline). A local path recorded there gives None.
    """
    teacher = str(teacher)
    if _looks_like_hub_id(teacher):
        return teacher
    if not os.path.isdir(teacher):
        return None
    found = _hub_id_of_cache_path(os.path.abspath(teacher))
    if found:
        return found
    for slot in ("unet", "transformer"):
        config = Path(teacher, slot, "config.json")
        if not config.is_file():
            continue
        origin = str(json.loads(config.read_text()).get("_name_or_path") or "")
        return _hub_id_of_cache_path(origin) or (origin if _looks_like_hub_id(origin) and not os.path.isabs(origin) else None)
    return None


def teacher_license(teacher: str | os.PathLike, hub_id: str | None = None, revision: str | None = None,
                    token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                    local_files_only: bool = False) -> dict[str, str]:
    """The teacher's license metadata (``license``, and ``license_name`` / ``license_link`` where set), for
    :func:`render_model_card`: a model distilled from a teacher is under the teacher's license.

    Read from the teacher's own card: ``README.md`` in a local teacher folder, else the Hub repo ``hub_id``'s
    (``hf_hub_download``: from the cache when offline or ``local_files_only``). A relative ``license_link`` (a
    file of the teacher's repo) becomes the file's Hub URL, or is dropped when there is no Hub id. Nothing
    found: ``{"license": "other"}``.
    """
    from huggingface_hub import ModelCard, hf_hub_download, hf_hub_url

    readme = Path(teacher, "README.md")
    if os.path.isdir(teacher) and readme.is_file():
        source = str(readme)
    elif hub_id:
        try:
            source = hf_hub_download(hub_id, "README.md", revision=revision, token=token, cache_dir=cache_dir,
                                     local_files_only=local_files_only)
        except Exception as err:  # offline and not cached, no card, no access: the card says "other"
            logger.warning(f"the license of {hub_id} is unknown ({type(err).__name__}); the model card says 'other'.")
            return {"license": "other"}
    else:
        return {"license": "other"}
    metadata = ModelCard.load(source, ignore_metadata_errors=True).data.to_dict()
    found = {k: metadata[k] for k in _LICENSE_FIELDS if isinstance(metadata.get(k), str) and metadata[k]}
    link = found.get("license_link")
    if link and not re.match(r"[a-z]+://", link):
        if hub_id:
            found["license_link"] = hf_hub_url(hub_id, link, revision=revision)
        else:
            del found["license_link"]
    found.setdefault("license", "other")
    return found


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
