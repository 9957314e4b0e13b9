"""CLIP score: how well generated images match their prompts, in a CLIP / SigLIP embedding space.

Definition (Hessel et al. 2021, "CLIPScore", with w = 100 as text-to-image papers report it)::

    CLIPScore(image, prompt) = max(100 * cos(E_I(image), E_T(prompt)), 0)

``E_I`` and ``E_T`` are the model's projected image and text embeddings (``get_image_features`` /
``get_text_features``), the reported number the mean over the (image, prompt) pairs. Units: hundredths of a
cosine, in [0, 100]; higher is better. Scores are comparable only under one model (its id is reported with the
score) and one preprocessing.

Preprocessing: the images (float (N, C, H, W) in [-1, 1], the library's convention) become 8-bit PIL images
through :func:`fd_onestep.images.tensor_to_pil` (diffusers' ``VaeImageProcessor``, what a pipeline's
``output_type="pil"`` gives: what a user would save and score), then go through the model's own processor
(``AutoProcessor``: resize, crop, normalization, tokenization). Prompts are truncated to the text tower's
length; SigLIP-family models get ``padding="max_length"``, as they were trained.

:func:`clip_scores` / :func:`clip_score` are the functional form; :class:`CLIPScore` accumulates over batches
and processes (``update``, ``all_reduce``, ``compute``), as torchmetrics' ``CLIPScore`` does.

torchmetrics' ``clip_score`` clips the *mean* (``max(mean(100 cos), 0)``); this module clips each pair, the
definition above. They agree whenever no pair has a negative cosine.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable, Optional, Sequence, Tuple

import torch

__all__ = ["CLIP_SCORE_DEFINITION", "load_clip_model", "image_embeddings", "text_embeddings", "clip_scores", "clip_score", "CLIPScore",
           "generator_clip_score"]

CLIP_SCORE_DEFINITION = "mean over (image, prompt) pairs of max(100 * cos(image embedding, prompt embedding), 0)"


def load_clip_model(spec: str | os.PathLike, device: str | torch.device | None = None, **kwargs) -> Tuple[object, object]:
    """``(model, processor)`` of a CLIP / SigLIP-style model with an image and a text tower, in eval mode.

    ``spec``: a local folder or a Hub id, loaded with ``AutoModel`` and ``AutoProcessor`` (``kwargs`` go to both
    ``from_pretrained`` calls: ``local_files_only``, ``cache_dir``, ``revision``). Raises ``ValueError`` when the
    model has no text tower (a vision-only encoder such as DINOv2).
    """
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(spec, **kwargs)
    if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
        raise ValueError(
            f"{spec} ({type(model).__name__}) has no text tower: CLIP score needs a model with image and text "
            "embeddings in one space (CLIPModel, SiglipModel, ...), e.g. openai/clip-vit-large-patch14."
        )
    processor = AutoProcessor.from_pretrained(spec, **kwargs)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, processor


def _embeddings(output) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding; older a tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _text_inputs(processor, prompts: Sequence[str], model) -> dict:
    siglip = "siglip" in str(getattr(model.config, "model_type", ""))
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer(list(prompts), padding="max_length" if siglip else True, truncation=True, return_tensors="pt")


@torch.no_grad()
def image_embeddings(images: torch.Tensor, model, processor) -> torch.Tensor:
    """float (N, C, H, W) in [-1, 1] (C = 1, scored as RGB gray, or 3) -> float64 (N, D) image embeddings
    (``get_image_features`` in the model's dtype, not normalized), on the model's device."""
    from .images import tensor_to_pil

    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W) in [-1, 1], got shape {tuple(images.shape)}.")
    device = next(model.parameters()).device
    pixels = processor(images=tensor_to_pil(images), return_tensors="pt")["pixel_values"].to(device, model.dtype)
    return _embeddings(model.get_image_features(pixel_values=pixels)).double()


@torch.no_grad()
def text_embeddings(prompts: Sequence[str], model, processor) -> torch.Tensor:
    """N prompts -> float64 (N, D) text embeddings (``get_text_features`` in the model's dtype, not normalized), on
    the model's device."""
    device = next(model.parameters()).device
    text = {k: v.to(device) for k, v in _text_inputs(processor, prompts, model).items()}
    return _embeddings(model.get_text_features(**text)).double()


def clip_scores(images: torch.Tensor, prompts: Sequence[str], model, processor, *, batch_size: int = 64) -> torch.Tensor:
    """Per-pair CLIP scores.

    Args:
        images: float (N, C, H, W) in [-1, 1], C = 1 (gray, scored as RGB) or 3; any size (the processor resizes).
        prompts: N strings, prompt i belongs to image i.
        model, processor: from :func:`load_clip_model` (a transformers model with ``get_image_features`` and
            ``get_text_features``, and its ``AutoProcessor``).
        batch_size: pairs per model call (memory only; the scores do not depend on it).
    Returns:
        float64 (N,) on the CPU: ``max(100 * cos(E_I, E_T), 0)`` per pair, in [0, 100] (cosines in float64 of the
        embeddings the model computes in its dtype).
    """
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        raise ValueError(f"one prompt per image: got {1 if isinstance(prompts, str) else len(prompts)} prompt(s) for "
                         f"{images.shape[0]} images; pass a list of N prompts.")
    scores = []
    for start in range(0, images.shape[0], batch_size):
        image_embeds = image_embeddings(images[start : start + batch_size], model, processor)
        text_embeds = text_embeddings(prompts[start : start + batch_size], model, processor)
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        scores.append((100 * cosine).clamp(min=0).cpu())
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


def clip_score(images: torch.Tensor, prompts: Sequence[str], model, processor, *, batch_size: int = 64) -> float:
    """Mean of :func:`clip_scores` over the N pairs (hundredths of a cosine, in [0, 100])."""
    return CLIPScore(model, processor, batch_size=batch_size).update(images, prompts).compute()


class CLIPScore:
    """Accumulates CLIP score over batches and processes: ``update(images, prompts)``, ``all_reduce()``, ``compute()``.

    ``model, processor``: from :func:`load_clip_model`; ``name`` is what the score is reported with (the model's
    folder or Hub id). The running sum is float64, so the mean does not depend on the batching.
    """

    def __init__(self, model, processor, *, name: Optional[str] = None, batch_size: int = 64):
        self.model, self.processor, self.batch_size = model, processor, batch_size
        self.name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self.total = 0.0
        self.count = 0

    @classmethod
    def from_pretrained(cls, spec: str | os.PathLike, device=None, batch_size: int = 64, **kwargs) -> "CLIPScore":
        """:func:`load_clip_model` of ``spec``; the score is reported under ``spec``."""
        model, processor = load_clip_model(spec, device=device, **kwargs)
        return cls(model, processor, name=str(spec), batch_size=batch_size)

    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> "CLIPScore":
        """Add a batch: images float (B, C, H, W) in [-1, 1] and their B prompts."""
        scores = clip_scores(images, prompts, self.model, self.processor, batch_size=self.batch_size)
        self.total += float(scores.double().sum())
        self.count += int(scores.numel())
        return self

    def all_reduce(self, device: torch.device | str | None = None) -> "CLIPScore":
        """Sum over ``torch.distributed`` processes (collective; ``device``: the process's device, NCCL's CUDA)."""
        from .distributed import all_reduce_sum

        total = all_reduce_sum(torch.tensor([self.total], dtype=torch.float64, device=device))
        count = all_reduce_sum(torch.tensor([self.count], dtype=torch.int64, device=device))
        self.total, self.count = float(total[0]), int(count[0])
        return self

    def compute(self) -> float:
        """Mean CLIP score of the pairs seen."""
        if self.count == 0:
            raise ValueError("CLIP score of 0 pairs is undefined; update() with some images and prompts first.")
        return self.total / self.count

    def reset(self) -> "CLIPScore":
        self.total, self.count = 0.0, 0
        return self


@lru_cache(maxsize=2)
def _cached_scorer(spec: str, device: str) -> CLIPScore:
    return CLIPScore.from_pretrained(spec, device=device)


def generator_clip_score(spec: str | os.PathLike, gen, generate: Callable, num_samples: int, *, seed: int,
                         batch_size: int, device) -> CLIPScore:
    """CLIP score of a text-conditional :class:`fd_onestep.onestep.OneStepGenerator`'s samples (training validation).

    ``num_samples`` prompts drawn uniformly from ``gen.prompts`` (``torch.Generator`` seeded with ``seed``), each
    sampled once: ``images = generate(noise, gen.encode_prompts(prompts))`` (float (B, C, H, W), clamped to
    [-1, 1] as saved images are) scored by the CLIP model ``spec`` (loaded once per process and device). Returns the
    accumulator (``compute()``: the score, ``count``: the pairs, ``name``: ``spec``).
    """
    if not getattr(gen, "prompts", None):
        raise ValueError("CLIP score needs a text-to-image model trained on prompts; drop --eval_clip_model.")
    scorer = _cached_scorer(str(spec), str(device)).reset()
    rng = torch.Generator().manual_seed(seed)
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        prompts = [gen.prompts[int(i)] for i in torch.randint(len(gen.prompts), (n,), generator=rng)]
        noise = gen.sample_noise(n, generator=rng, device=device)
        with torch.no_grad():
            images = generate(noise, gen.encode_prompts(prompts, device=device))
        scorer.update(images.float().clamp(-1, 1), prompts)
    return scorer
