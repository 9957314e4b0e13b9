"""Training-side one-step generator: ``noise (+ condition) -> image`` around an :class:`FDOneStepPipeline`.

The parameterization math (epsilon / v / sample / flow -> clean sample) lives in ONE place, the
self-contained pipeline file ``pipelines/pipeline_fd_onestep.py`` (it must travel to Hub repos
alone); this module only adds what training needs on top of it:

- the latent / pixel shape of the generator input and ``sample_noise``;
- conditioning sampling: uniform or histogram-weighted class labels for class-conditional models,
  prompt embeddings (frozen text encoders, cached per prompt) for text-to-image models;
- a differentiable ``forward(denoiser, noise, conditioning) -> images in [-1, 1]`` that takes the
  denoiser as an argument, so an ``accelerator.prepare``-d (DDP-wrapped) or PEFT-wrapped copy is the one
  that runs and receives gradients; the VAE and text encoders stay frozen;
- saving the result: the full one-step pipeline (``save_pipeline``) or only a LoRA
  (``save_lora``, diffusers' LoRA file format).

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

import os
from typing import Sequence

import torch

from fd_onestep.pipelines.pipeline_fd_onestep import (
    FDOneStepPipeline,
    OneStepConditioning,
    add_lora_to_denoiser,
    denoiser_lora_state_dict,
)

__all__ = [
    "OneStepGenerator",
    "OneStepConditioning",
    "add_lora_to_denoiser",
    "denoiser_lora_state_dict",
]


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / DataParallel / torch.compile wrappers (accelerate's own unwrapping)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module, keep_torch_compile=False)


class OneStepGenerator:
    """A one-step generator ``(noise, conditioning) -> images`` built from an :class:`FDOneStepPipeline`.

    Args:
        pipeline: the one-step pipeline (its denoiser is the model that gets trained; its VAE and text
            encoders are frozen by this constructor: ``requires_grad_(False)`` and ``eval()``).
        prompts: text-to-image families only: the training prompts ``sample_conditioning`` draws from
            (uniformly, with replacement). Their embeddings are computed once with the frozen text
            encoders and cached. Required for text families unless conditioning is passed explicitly.
        class_histogram: class-conditional families only: unnormalized weights (num_classes,) to draw
            class labels from, e.g. the reference data's label histogram. ``None``: uniform.
        device: where noise, conditioning and the frozen modules live. Default: the denoiser's device.

    Attributes:
        family (str): "unet2d", "dit", "sd", "sd3" or "flux" (see ``FDOneStepPipeline.SUPPORTED_FAMILIES``).
        noise_shape (tuple[int, int, int]): (C, h, w) of one generator input (pixels or VAE latents).
        image_shape (tuple[int, int, int]): (C, H, W) of one generated image.
        is_class_conditional, is_text_conditional (bool), num_classes (int | None).
        denoiser (torch.nn.Module): ``pipeline.unet`` or ``pipeline.transformer``.
    """

    def __init__(
        self,
        pipeline: FDOneStepPipeline,
        *,
        prompts: Sequence[str] | None = None,
        class_histogram: Sequence[float] | torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ):
        if not isinstance(pipeline, FDOneStepPipeline):
            raise TypeError(
                f"OneStepGenerator needs an FDOneStepPipeline, got {type(pipeline).__name__}; build one with "
                "FDOneStepPipeline.from_teacher(<diffusers repo or folder>) or FDOneStepPipeline.from_pretrained(<dir>)."
            )
        self.pipeline = pipeline
        self.family: str = pipeline.family
        self.device = torch.device(device) if device is not None else pipeline.denoiser.device
        for name in pipeline.frozen_component_names:
            module = getattr(pipeline, name)
            module.requires_grad_(False)
            module.eval()
            module.to(self.device)
        pipeline.denoiser.to(self.device)

        self.noise_shape: tuple[int, int, int] = pipeline.noise_shape()
        self.image_shape: tuple[int, int, int] = pipeline.image_shape()
        self.is_class_conditional: bool = pipeline.is_class_conditional
        self.is_text_conditional: bool = pipeline.is_text_conditional
        self.num_classes: int | None = pipeline.num_classes

        self._prompt_cache: dict[str, OneStepConditioning] = {}
        self.prompts: list[str] | None = None
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
            self.encode_prompts(prompts)  # fill the cache once, with the frozen encoders

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
        Text: prompts drawn uniformly from ``self.prompts`` (cached embeddings).
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
            return self.encode_prompts([self.prompts[i] for i in index.tolist()]).to(device)
        return None

    def encode_prompts(self, prompts: Sequence[str]) -> OneStepConditioning:
        """Prompt embeddings (and, with guidance, negative embeddings) for a list of prompts.

        Computed once per distinct prompt with the frozen text encoders, then cached (on ``device``).
        """
        if not self.is_text_conditional:
            raise ValueError(f"the {self.family!r} family takes no prompts.")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                cond = self.pipeline.encode_conditioning(prompt=missing, device=self.device)
            for i, p in enumerate(missing):
                self._prompt_cache[p] = cond[i : i + 1]
        return OneStepConditioning.cat([self._prompt_cache[p] for p in prompts])

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
        return self.pipeline.one_step(noise, conditioning, denoiser=denoiser, decode=True)

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
        ``FDOneStepPipeline.load_lora_weights(output_dir)`` (and, for the "sd" family, with stock
        ``StableDiffusionPipeline.load_lora_weights``).
        """
        model = _unwrap(denoiser) if denoiser is not None else self.denoiser
        return FDOneStepPipeline.save_lora_weights(
            output_dir,
            denoiser_lora_layers=denoiser_lora_state_dict(model, adapter_name=adapter_name),
            family=self.family,
            weight_name=weight_name,
            lora_config=getattr(model, "peft_config", {}).get(adapter_name),
        )
