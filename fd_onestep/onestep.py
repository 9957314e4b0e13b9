"""Training-side one-step generator: ``noise (+ condition) -> image`` around an :class:`FDOneStepPipeline`.

The parameterization math (epsilon / v / sample / flow -> clean sample) lives in ONE place, the
self-contained pipeline file ``pipelines/pipeline_fd_onestep.py`` (it must travel to Hub repos
alone); this module only adds what training needs on top of it:

- the latent / pixel shape of the generator input and ``sample_noise``;
- conditioning sampling: uniform or histogram-weighted class labels for class-conditional models,
  prompt embeddings for text-to-image models (see "Prompt embeddings" below);
- mixed precision the way diffusers' training examples do it: frozen modules (VAE, text encoders) in the
  ``weight_dtype``, a LoRA's base weights too, its trainable parameters in float32 (``add_lora``);
- a differentiable ``forward(denoiser, noise, conditioning) -> images in [-1, 1]`` that takes the
  denoiser as an argument, so an ``accelerator.prepare``-d (DDP-wrapped) or PEFT-wrapped copy is the one
  that runs and receives gradients; the VAE and text encoders stay frozen;
- saving the result: the full one-step pipeline (``save_pipeline``) or only a LoRA
  (``save_lora``, diffusers' LoRA file format).

Prompt embeddings
-----------------
Every distinct training prompt is encoded once, at construction, by the pipeline's ``encode_conditioning``
(the stock ``encode_prompt``), ``prompt_chunk_size`` prompts per call (``PROMPT_CHUNK_SIZE`` by default),
and cached on the CPU; each step moves only its sampled rows to the device. Why a cache and not an
encoding per step: the FD-loss must see the same embedding for the same prompt every time (a batched
encode is not bitwise independent of what else is in the batch, and a resumed run must see the same
embeddings), and the text encoders (T5-XXL for SD3 / Flux) then run once instead of every step. The
memory it costs is host memory, ``N x (L x D + P) x bytes per element`` for N prompts (SD3 in bf16:
about 2.7 MB per prompt, L = 333 tokens x D = 4096), logged at construction; on the device it is one
chunk's activations while encoding and one batch's rows while training. The cache is not pinned: a
step's rows are gathered into a fresh tensor anyway, and page-locking a cache of many GB would take
that memory from the host.

Typical use with accelerate::

    pipe = FDOneStepPipeline.from_teacher("google/ddpm-cifar10-32")      # or .from_pretrained(dir)
    gen = OneStepGenerator(pipe, device=accelerator.device)
    denoiser = gen.denoiser                      # pipe.unet or pipe.transformer, trainable
    denoiser.train()
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    for step in ...:
        noise = gen.sample_noise(batch_size, generator=g)            # (B, *gen.noise_shape)
        cond = gen.sample_conditioning(batch_size, generator=g)      # None for unconditional models
        images = gen(denoiser, noise, cond)                         # (B, C, H, W) in [-1, 1], has grad
        loss = fd_loss(encoder(images)); accelerator.backward(loss)
    gen.save_pipeline(output_dir, denoiser=accelerator.unwrap_model(denoiser))
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Callable, Sequence

import torch

from fd_onestep.memory_savers import DecodeSavers, decode_with_savers
from fd_onestep.pipelines.pipeline_fd_onestep import (
    FDOneStepPipeline,
    OneStepConditioning,
    add_lora_to_denoiser,
    apply_output_bound,
    denoiser_lora_state_dict,
)

__all__ = [
    "OneStepGenerator",
    "OneStepConditioning",
    "PROMPT_CHUNK_SIZE",
    "add_lora_to_denoiser",
    "denoiser_lora_state_dict",
]

logger = logging.getLogger(__name__)

# Prompts per text-encoder call when the prompt cache is filled. It bounds the encoders' transient
# device memory whatever the number of prompts: T5-XXL (64 heads) at 512 tokens materializes
# 32 x 64 x 512^2 attention scores per layer, about 1 GiB in bf16, for a chunk of 32.
PROMPT_CHUNK_SIZE = 32


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / DataParallel / torch.compile wrappers (accelerate's own unwrapping)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module, keep_torch_compile=False)


def encode_in_chunks(
    encode: Callable[[list[str]], OneStepConditioning], prompts: Sequence[str], chunk_size: int
) -> OneStepConditioning:
    """Embeddings of ``prompts`` gathered on the CPU, ``encode`` called on at most ``chunk_size`` prompts at a time.

    Args:
        encode: list of prompts -> their conditioning rows (any device; no grad needed).
        prompts: N >= 1 prompts.
        chunk_size: prompts per ``encode`` call (>= 1).
    Returns:
        conditioning with N rows on the CPU, in the dtypes ``encode`` returned. The output is allocated
        once, from the first chunk's shapes, and filled in place: host memory peaks at the cache's size.
    """
    if chunk_size < 1:
        raise ValueError(f"prompt chunk size must be >= 1, got {chunk_size}.")
    prompts = list(prompts)
    out = None
    for start in range(0, len(prompts), chunk_size):
        with torch.no_grad():
            chunk = encode(prompts[start : start + chunk_size])
        if out is None:
            out = chunk.new_empty(len(prompts), device="cpu")
        out[start : start + len(chunk)] = chunk
    return out


def num_label_classes(pipeline: FDOneStepPipeline, prompt_labels=None) -> int | None:
    """How many label classes a generator asks for: a class-conditional pipeline's ``num_classes`` (its null
    class excluded), else ``max(prompt_labels) + 1`` for prompts labeled by class (int, one per prompt), else
    None (unlabeled)."""
    if pipeline.is_class_conditional:
        return pipeline.num_classes
    if prompt_labels is None or len(prompt_labels) == 0:
        return None
    return int(torch.as_tensor(prompt_labels).max()) + 1


def _conditioning_bytes(cond: OneStepConditioning) -> int:
    return sum(t.nbytes for t in vars(cond).values() if isinstance(t, torch.Tensor))


class OneStepGenerator:
    """A one-step generator ``(noise, conditioning) -> images`` built from an :class:`FDOneStepPipeline`.

    Args:
        pipeline: the one-step pipeline (its denoiser is the model that gets trained; its VAE and text
            encoders are frozen by this constructor: ``requires_grad_(False)`` and ``eval()``).
        prompts: text-to-image families only: the training prompts ``sample_conditioning`` draws from
            (uniformly, with replacement). Their embeddings are computed once with the frozen text
            encoders, ``prompt_chunk_size`` prompts per call, and cached on the CPU (module docstring).
            Required for text families unless conditioning is passed explicitly.
        prompt_labels: with ``prompts``: the class each prompt names (one int in ``[0, C)`` per prompt, e.g.
            the digit of "the digit seven"). The drawn conditioning then carries them as ``class_labels``
            (for the joint FD-loss, adherence and per-class measures; the denoiser never sees them), and
            :meth:`conditioning_for_labels` picks prompts that name requested classes.
        class_histogram: class-conditional families only: unnormalized weights (num_classes,) to draw
            class labels from, e.g. the reference data's label histogram. ``None``: uniform.
        device: where noise, conditioning and the frozen modules live. Default: the denoiser's device.
        weight_dtype: mixed precision (``torch.bfloat16`` / ``torch.float16``, from
            ``accelerator.mixed_precision`` as in diffusers' examples): the frozen modules are cast to it
            here, and ``add_lora`` casts the LoRA's base weights to it. ``None`` (default): dtypes are left as
            they are (a full fine-tune keeps its float32 denoiser in any case).
        prompt_chunk_size: prompts per text-encoder call when filling the cache (``PROMPT_CHUNK_SIZE``).
        decode_savers: latent families: the decode's memory savers (:mod:`fd_onestep.memory_savers`: micro-batches,
            surrogate decoder gradient); the images keep the full decode's values. None: the pipeline's own decode.
        prompt_store: a :class:`fd_onestep.prompt_store.PromptStore` holding the embeddings of every prompt this
            generator will be asked for (training and validation prompts): its memory-mapped rows replace the
            in-memory cache, and the text encoders are never called (they may be off the device).

    Attributes:
        family (str): the pipeline's family, a key of ``FDOneStepPipeline.FAMILY_ADAPTERS``.
        noise_shape (tuple[int, int, int]): (C, h, w) of one generator input (pixels or VAE latents).
        image_shape (tuple[int, int, int]): (C, H, W) of one generated image.
        is_class_conditional, is_text_conditional (bool), num_classes (int | None).
        labeled (bool): the conditioning names classes (class-conditional, or prompts with ``prompt_labels``);
        num_label_classes (int | None): how many (``num_classes``, or ``max(prompt_labels) + 1``).
        denoiser (torch.nn.Module): ``pipeline.unet`` or ``pipeline.transformer``.
        prompt_embeddings (OneStepConditioning | None): the CPU cache, one row per distinct prompt.
    """

    def __init__(
        self,
        pipeline: FDOneStepPipeline,
        *,
        prompts: Sequence[str] | None = None,
        prompt_labels: Sequence[int] | torch.Tensor | None = None,
        class_histogram: Sequence[float] | torch.Tensor | None = None,
        device: torch.device | str | None = None,
        weight_dtype: torch.dtype | None = None,
        prompt_chunk_size: int = PROMPT_CHUNK_SIZE,
        decode_savers: DecodeSavers | None = None,
        prompt_store=None,
    ):
        if not isinstance(pipeline, FDOneStepPipeline):
            raise TypeError(
                f"OneStepGenerator needs an FDOneStepPipeline, got {type(pipeline).__name__}; build one with "
                "FDOneStepPipeline.from_teacher(<diffusers repo or folder>) or FDOneStepPipeline.from_pretrained(<dir>)."
            )
        self.pipeline = pipeline
        self.family: str = pipeline.family
        self.device = torch.device(device) if device is not None else pipeline.denoiser.device
        if weight_dtype is not None and not (isinstance(weight_dtype, torch.dtype) and weight_dtype.is_floating_point):
            raise ValueError(
                f"weight_dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None, got {weight_dtype!r}."
            )
        self.weight_dtype = weight_dtype
        if prompt_chunk_size < 1:
            raise ValueError(f"prompt_chunk_size must be >= 1, got {prompt_chunk_size}.")
        self.prompt_chunk_size = int(prompt_chunk_size)
        self.decode_savers = decode_savers if decode_savers is not None else DecodeSavers()
        if self.decode_savers.active and not pipeline.is_latent:
            raise ValueError("decode savers (micro-batches, surrogate decoder) apply to latent models; this one "
                             "generates pixels: drop them.")
        if self.decode_savers.surrogate is not None:
            self.decode_savers.surrogate.to(self.device, dtype=weight_dtype)
        keep_float32 = set(pipeline.float32_component_names)  # e.g. an SDXL VAE with force_upcast
        for name in pipeline.frozen_component_names:
            module = getattr(pipeline, name)
            module.requires_grad_(False)
            module.eval()
            dtype = torch.float32 if (weight_dtype is not None and name in keep_float32) else weight_dtype
            module.to(self.device, dtype=dtype)
        pipeline.denoiser.to(self.device)

        self.noise_shape: tuple[int, int, int] = pipeline.noise_shape()
        self.image_shape: tuple[int, int, int] = pipeline.image_shape()
        self.is_class_conditional: bool = pipeline.is_class_conditional
        self.is_text_conditional: bool = pipeline.is_text_conditional
        self.num_classes: int | None = pipeline.num_classes

        # the CPU cache: one row per distinct prompt, and each prompt's row
        self.prompt_embeddings: OneStepConditioning | None = None
        self._prompt_row: dict[str, int] = {}
        self._rows_of_prompts: torch.Tensor | None = None  # (len(self.prompts),) int64: row of each entry
        self.prompts: list[str] | None = None
        self.prompt_store = prompt_store
        if prompt_store is not None:
            self.prompt_embeddings, self._prompt_row = prompt_store, prompt_store.row_of
        if prompts is not None:
            if not self.is_text_conditional:
                raise ValueError(
                    f"prompts were given but the {self.family!r} family is not text-conditioned; drop `prompts` "
                    "(use `class_histogram` for class-conditional models)."
                )
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not prompts:
                raise ValueError("`prompts` is empty; pass at least one training prompt.")
            self.prompts = prompts
            self._cache_prompts(prompts)  # fill the cache once, with the frozen encoders
            self._rows_of_prompts = torch.tensor([self._prompt_row[p] for p in prompts], dtype=torch.long)
            if prompt_store is None:
                logger.info(f"cached the embeddings of {len(self._prompt_row)} distinct prompts on the CPU "
                            f"({_conditioning_bytes(self.prompt_embeddings) / 2**20:.1f} MiB)")

        self.prompt_labels: torch.Tensor | None = None
        if prompt_labels is not None:
            if self.prompts is None:
                raise ValueError("prompt_labels name the class of each prompt: pass them together with `prompts`.")
            labels = torch.as_tensor(prompt_labels, dtype=torch.long).reshape(-1)
            if labels.numel() != len(self.prompts) or (labels.numel() and int(labels.min()) < 0):
                raise ValueError(f"prompt_labels must hold one class >= 0 per prompt: {labels.numel()} labels for "
                                 f"{len(self.prompts)} prompts.")
            self.prompt_labels = labels
        self.labeled: bool = self.is_class_conditional or self.prompt_labels is not None
        self.num_label_classes: int | None = num_label_classes(pipeline, self.prompt_labels)

        self.class_probabilities: torch.Tensor | None = None
        if class_histogram is not None:
            if not self.is_class_conditional:
                raise ValueError(
                    f"class_histogram was given but the {self.family!r} pipeline is not class-conditional; drop it."
                )
            hist = torch.as_tensor(class_histogram, dtype=torch.float64).flatten()
            if hist.numel() != self.num_classes:
                raise ValueError(
                    f"class_histogram has {hist.numel()} entries but the model has {self.num_classes} classes; "
                    "pass one weight per class label 0..num_classes-1."
                )
            if not torch.isfinite(hist).all() or (hist < 0).any() or hist.sum() <= 0:
                raise ValueError("class_histogram must be finite, non-negative and not all zero.")
            self.class_probabilities = hist / hist.sum()
        elif self.is_class_conditional:
            self.class_probabilities = torch.full((self.num_classes,), 1.0 / self.num_classes, dtype=torch.float64)

    # ------------------------------------------------------------------ properties
    @property
    def denoiser(self) -> torch.nn.Module:
        """The trainable network (``pipeline.unet`` or ``pipeline.transformer``)."""
        return self.pipeline.denoiser

    # ------------------------------------------------------------------ sampling
    def sample_noise(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Standard normal generator input, (batch_size, *noise_shape), ``dtype`` (float32 default).

        Drawn on ``generator``'s device (CPU generator: CPU, then moved), so a seeded generator gives the
        same noise on any accelerator.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn((batch_size, *self.noise_shape), generator=generator, device=gen_device, dtype=dtype)
        return noise.to(device if device is not None else self.device)

    def sample_conditioning(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> OneStepConditioning | None:
        """Conditioning for ``batch_size`` samples, or ``None`` for unconditional models.

        Class-conditional: labels (batch_size,) int64 drawn from ``class_probabilities``.
        Text: prompts drawn uniformly from ``self.prompts``; their cached rows are gathered on the CPU and
        only those move to ``device``.
        The random draw uses ``generator`` (CPU or the generator's device).
        """
        device = torch.device(device) if device is not None else self.device
        if self.is_class_conditional:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            probs = self.class_probabilities.to(gen_device, torch.float32)
            labels = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
            return OneStepConditioning(class_labels=labels.to(device))
        if self.is_text_conditional:
            if self.prompts is None:
                raise ValueError(
                    f"the {self.family!r} pipeline is text-conditioned: pass `prompts=[...]` to OneStepGenerator "
                    "(or build conditioning with `encode_prompts`)."
                )
            gen_device = generator.device if generator is not None else torch.device("cpu")
            index = torch.randint(len(self.prompts), (batch_size,), generator=generator, device=gen_device)
            return self._prompt_conditioning(index.cpu(), device)
        return None

    def _prompt_conditioning(self, index: torch.Tensor, device) -> OneStepConditioning:
        """The cached embeddings of prompts ``index`` (CPU int64), with their labels if known, on ``device``."""
        cond = self.prompt_embeddings[self._rows_of_prompts[index]]
        if self.prompt_labels is not None:
            cond = replace(cond, class_labels=self.prompt_labels[index])
        return cond.to(device)

    def conditioning_for_labels(
        self,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> OneStepConditioning:
        """Conditioning that asks for the classes ``labels`` ((B,) int64): class labels for class-conditional
        models; for prompts with ``prompt_labels``, per row a prompt naming that class, drawn uniformly among them
        with ``generator`` (CPU)."""
        device = torch.device(device) if device is not None else self.device
        labels = torch.as_tensor(labels).to("cpu", torch.long).reshape(-1)
        if self.is_class_conditional:
            return OneStepConditioning(class_labels=labels.to(device))
        if self.prompt_labels is None:
            raise ValueError("conditioning_for_labels needs a class-conditional model or prompts with prompt_labels.")
        index = torch.empty_like(labels)
        for c in torch.unique(labels).tolist():
            rows = (labels == c).nonzero().flatten()
            candidates = (self.prompt_labels == c).nonzero().flatten()
            if candidates.numel() == 0:
                raise ValueError(f"no prompt names class {c}; prompt_labels cover {sorted(set(self.prompt_labels.tolist()))}.")
            index[rows] = candidates[torch.randint(candidates.numel(), (rows.numel(),), generator=generator)]
        return self._prompt_conditioning(index, device)

    def encode_prompts(self, prompts: Sequence[str], device: torch.device | str | None = None) -> OneStepConditioning:
        """Prompt embeddings (and, with guidance, negative embeddings) for a list of prompts, on ``device``
        (default ``self.device``).

        Computed once per distinct prompt with the frozen text encoders (in chunks), then cached on the CPU.
        """
        if not self.is_text_conditional:
            raise ValueError(f"the {self.family!r} family takes no prompts.")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self._cache_prompts(prompts)
        rows = torch.tensor([self._prompt_row[p] for p in prompts], dtype=torch.long)
        return self.prompt_embeddings[rows].to(device if device is not None else self.device)

    def _cache_prompts(self, prompts: Sequence[str]) -> None:
        """Encode the prompts not yet cached, ``prompt_chunk_size`` per call, and append their rows to the cache."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_row]
        if not missing:
            return
        if self.prompt_store is not None:
            raise ValueError(f"{len(missing)} prompt(s) are not in the prompt store {self.prompt_store.folder} (e.g. "
                             f"{missing[0]!r}): build the store with every training and validation prompt.")
        new = encode_in_chunks(lambda chunk: self.pipeline.encode_conditioning(prompt=chunk, device=self.device),
                               missing, self.prompt_chunk_size)
        start = len(self._prompt_row)
        self._prompt_row.update({p: start + i for i, p in enumerate(missing)})
        self.prompt_embeddings = new if self.prompt_embeddings is None else OneStepConditioning.cat(
            [self.prompt_embeddings, new])

    # ------------------------------------------------------------------ LoRA training
    def add_lora(
        self,
        rank: int = 8,
        alpha: float | None = None,
        target_modules: list[str] | None = None,
        adapter_name: str = "default",
    ) -> torch.nn.Module:
        """Freeze the denoiser and add a trainable LoRA (``add_lora_to_denoiser``), mixed-precision ready.

        As diffusers' LoRA training examples do: under ``weight_dtype`` the frozen base weights are cast to
        it before the adapter is added, and the trainable (LoRA) parameters are then cast to float32
        (``diffusers.training_utils.cast_training_params``), so the optimizer updates float32 weights.
        Without ``weight_dtype`` nothing is cast. Returns the denoiser.
        """
        denoiser = self.denoiser
        if self.weight_dtype is not None:
            denoiser.to(dtype=self.weight_dtype)
        add_lora_to_denoiser(denoiser, rank=rank, alpha=alpha, target_modules=target_modules,
                             adapter_name=adapter_name)
        if self.weight_dtype is not None:
            from diffusers.training_utils import cast_training_params

            cast_training_params(denoiser, dtype=torch.float32)
        return denoiser

    # ------------------------------------------------------------------ the generator
    def forward(
        self,
        denoiser: torch.nn.Module | None,
        noise: torch.Tensor,
        conditioning: OneStepConditioning | None = None,
    ) -> torch.Tensor:
        """Differentiable one-step generation.

        Args:
            denoiser: the network to run (possibly DDP- or PEFT-wrapped); ``None`` uses ``self.denoiser``.
            noise: (B, *noise_shape) float, from ``sample_noise``.
            conditioning: from ``sample_conditioning`` (None for unconditional models).

        Returns:
            images (B, C, H, W) float32 in [-1, 1] (VAE decode included for latent families), with
            gradient w.r.t. the denoiser's parameters. Exactly one denoiser forward (two with guidance).
        """
        if not self.decode_savers.active:
            return self.pipeline.one_step(noise, conditioning, denoiser=denoiser, decode=True)
        latents = self.pipeline.one_step(noise, conditioning, denoiser=denoiser, decode=False)
        images = decode_with_savers(self.pipeline.decode_latents, latents, self.decode_savers)
        return apply_output_bound(images, self.pipeline.config.output_bound)

    __call__ = forward

    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        denoiser: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """No-grad convenience: noise + conditioning + forward. Returns (B, C, H, W) in [-1, 1]."""
        noise = self.sample_noise(batch_size, generator=generator)
        cond = self.sample_conditioning(batch_size, generator=generator)
        return self.forward(denoiser, noise, cond)

    # ------------------------------------------------------------------ saving
    def save_pipeline(
        self, output_dir: str | os.PathLike, denoiser: torch.nn.Module | None = None, **save_kwargs
    ) -> str:
        """Write the one-step pipeline to ``output_dir`` (loadable by ``FDOneStepPipeline.from_pretrained``
        and stock ``DiffusionPipeline.from_pretrained(..., custom_pipeline=..., trust_remote_code=True)``).

        ``denoiser``: the trained network (wrappers are stripped). If it carries a PEFT LoRA, the LoRA is
        merged into a copy of the base weights, so the saved pipeline is a plain full model; use
        ``save_lora`` to publish the adapter alone. Returns ``output_dir``.
        """
        return self.pipeline.save_one_step(output_dir, denoiser=_unwrap(denoiser) if denoiser is not None else None,
                                           **save_kwargs)

    def save_lora(
        self,
        output_dir: str | os.PathLike,
        denoiser: torch.nn.Module | None = None,
        adapter_name: str = "default",
        weight_name: str = "pytorch_lora_weights.safetensors",
    ) -> str:
        """Save the denoiser's LoRA (added with ``add_lora_to_denoiser``) in diffusers' LoRA file format.

        Returns the path of the written ``.safetensors`` file. Load it back with
        ``FDOneStepPipeline.load_lora_weights(output_dir)`` (and, for families with a diffusers LoRA loader, with
        the stock pipeline's ``load_lora_weights``, e.g. ``StableDiffusionXLPipeline``).
        """
        model = _unwrap(denoiser) if denoiser is not None else self.denoiser
        return FDOneStepPipeline.save_lora_weights(
            output_dir,
            denoiser_lora_layers=denoiser_lora_state_dict(model, adapter_name=adapter_name),
            family=self.family,
            weight_name=weight_name,
            lora_config=getattr(model, "peft_config", {}).get(adapter_name),
        )


def prepare_training(gen: OneStepGenerator, *, use_lora: bool = False, lora_rank: int = 8, lora_alpha=None,
                     lora_target_modules=None, gradient_checkpointing: bool = False,
                     vae_gradient_checkpointing: bool = False, channels_last: bool = False) -> list:
    """Make ``gen``'s denoiser trainable as a run with these flags does (the training script and ``fd-onestep
    plan`` both call this): a LoRA (``use_lora``) or the full denoiser, the memory savers on the denoiser and the
    VAE decoder, channels_last weights, train mode. Returns the trainable parameters.

    Raises ValueError naming the flag: a VAE without gradient checkpointing, LoRA targets PEFT cannot match, no
    trainable parameter.
    """
    pipe, denoiser = gen.pipeline, gen.denoiser
    if vae_gradient_checkpointing:
        if not getattr(pipe.vae, "_supports_gradient_checkpointing", False):
            raise ValueError(f"--vae_gradient_checkpointing: {type(pipe.vae).__name__} has no gradient checkpointing in "
                             "diffusers; use --decode_micro_batch_size instead.")
        pipe.vae.enable_gradient_checkpointing()
    if use_lora:
        try:
            gen.add_lora(rank=lora_rank, alpha=lora_alpha, target_modules=lora_target_modules)
        except ValueError as err:  # PEFT's, for targets the early checks could not check (a config they could not read)
            raise ValueError(f"--lora_target_modules {lora_target_modules or '(the family default)'}: {err} "
                             "Pass module-name suffixes of the denoiser's linear / convolution layers.") from None
    else:
        denoiser.requires_grad_(True)
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if channels_last:
        denoiser.to(memory_format=torch.channels_last)  # only 4-D (convolution) weights change layout
    denoiser.train()
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters (check --lora_target_modules: it matched no module).")
    return trainable
