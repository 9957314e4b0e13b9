# Copyright 2025 The fd-onestep authors. Licensed under the Apache License, Version 2.0.
"""``FDOneStepPipeline``: a diffusers model turned into a one-step generator.

This file is self-contained (torch, diffusers, transformers and the standard library; peft, accelerate
and safetensors are imported lazily by the LoRA functions) so that it can travel inside a Hub repository::

    pipe = DiffusionPipeline.from_pretrained("user/repo", custom_pipeline="pipeline_fd_onestep",
                                             trust_remote_code=True)

The one step
------------
Pure noise is fed to the denoiser as the noisy sample ``x_t`` at one noise level (``timestep`` in the
pipeline config; default the top of the schedule) and the model output is converted to the clean-sample
estimate ``x0`` for its parameterization, with ``a = alphas_cumprod[t]`` (DDPM-style schedules) or the
flow-matching sigma ``s`` (``x_t = (1 - s) x0 + s noise``, velocity ``v = noise - x0``):

=================  ==========================================
prediction_type    clean sample
=================  ==========================================
``epsilon``        x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)
``v_prediction``   x0 = sqrt(a) x_t - sqrt(1 - a) v
``sample``         x0 = model output
``flow``           x0 = x_t - s v
=================  ==========================================

The epsilon conversion multiplies the network's error by ``sqrt(1 - a) / sqrt(a)``; it is undefined at a
zero-terminal-SNR top level (``a = 0``) and badly conditioned near it (157x at t = 999 of the default linear
DDPM schedule): construction raises or warns there (see :func:`check_one_step_conditioning`).

Pipeline config (``pipe.config``; saved in ``model_index.json``)
-----------------------------------------------------------------
- ``family``: "unet2d" | "dit" | "sd" | "sdxl" | "sd3" | "flux" | "sana" | "qwenimage" | "zimage" | "flux2" |
  "flux2_klein" (detected from the components; one adapter class each, ``FAMILY_ADAPTERS``, owns everything that
  differs between families).
- ``timestep``: int. DDPM-style: the training timestep index in [0, num_train_timesteps - 1] (default the
  last one). Flow matching: the unshifted training timestep in [1, num_train_timesteps] (default
  num_train_timesteps, i.e. sigma = 1); the scheduler's ``shift`` (or its resolution-dependent dynamic
  shift) is applied exactly as the scheduler does.
- ``prediction_type``: "epsilon" | "v_prediction" | "sample" | "flow" (default: the scheduler's).
- ``guidance_scale``: float, classifier-free guidance inside the one step (1.0 = off). Class-conditional
  models use the null class ``null_class_label``; text models a negative prompt ("" by default) batched
  with the prompt; guidance-distilled Flux models receive it as their guidance embedding (one forward). Qwen-Image
  rescales the combination to the conditional prediction's norm per latent token, as ``QwenImagePipeline`` does.
- ``output_bound``: None | "tanh" | "clamp": bound applied to the image in [-1, 1] (pixel families: to
  ``x0``; latent families: to the decoded image). "tanh" keeps gradients everywhere (use it for training
  an ill-conditioned map); "clamp" is a hard clip.
- ``sample_size``: spatial size of the generator input (pixels for "unet2d", latents otherwise).
- ``null_class_label``: class id used as the unconditional label for guidance (DiT: its extra label; a
  class-conditional UNet2DModel: its last class embedding, ``num_class_embeds - 1``, which then is not one of
  the model's ``num_classes``).
- ``max_sequence_length``: T5 tokens for "sd3" / "flux", Gemma-2 tokens for "sana", Qwen2.5-VL / Qwen3 tokens for
  "qwenimage" / "zimage" (default 512, the stock pipelines'; prompts are right-padded to it with an attention mask),
  Mistral3 / Qwen3 tokens (chat template and prompt) for "flux2" / "flux2_klein".
- ``force_zeros_for_empty_prompt``: "sdxl": without a negative prompt the negative branch is zeros.
- ``complex_human_instruction``: "sana": the lines prepended to each prompt (default ``SanaPipeline``'s).
- ``is_distilled``: "flux2_klein": a step-distilled teacher (``is_distilled`` in its ``model_index.json``, which
  ``from_teacher`` reads) takes no guidance, as ``Flux2KleinPipeline`` ignores its ``guidance_scale``; None for
  other families.

Prompts are encoded by the family's stock pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline``, ``SanaPipeline``, ``QwenImagePipeline``, ``ZImagePipeline``,
``Flux2Pipeline``, ``Flux2KleinPipeline``)
``encode_prompt`` over the same text encoders,
so the denoiser gets the embeddings the stock pipeline would give it.

LoRA file format
----------------
One ``pytorch_lora_weights.safetensors`` file, diffusers' format: PEFT keys of the denoiser prefixed with the
component name (``unet.<module>.lora_A.weight`` / ``transformer.<module>.lora_B.weight``) and the PEFT
``LoraConfig`` as JSON in the safetensors metadata key ``lora_adapter_metadata``. Families with a diffusers LoRA
loader (the adapter's ``lora_loader``: ``StableDiffusionLoraLoaderMixin``, ``StableDiffusionXLLoraLoaderMixin``,
``SD3LoraLoaderMixin``, ``FluxLoraLoaderMixin``, ``SanaLoraLoaderMixin``, ``QwenImageLoraLoaderMixin``,
``ZImageLoraLoaderMixin``, ``Flux2LoraLoaderMixin``) are written and read by it, so a one-step
LoRA also loads into the stock pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ...);
"unet2d" and "dit" (whose diffusers models have no LoRA loader) use the same layout through PEFT directly.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, fields, replace

import diffusers
import torch
from diffusers import (
    DiffusionPipeline,
    DiTTransformer2DModel,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    ImagePipelineOutput,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE as FLUX2_SYSTEM_MESSAGE
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, format_input
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor


logger = logging.get_logger(__name__)

PIPELINE_FILE_NAME = "pipeline_fd_onestep.py"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"

DDPM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION_TYPES = ("flow",)
OUTPUT_BOUNDS = (None, "tanh", "clamp")
# error amplification of the epsilon conversion above which construction warns
EPSILON_AMPLIFICATION_WARN = 10.0
# DiffusionPipeline.from_pretrained takes `dtype` from diffusers 0.40 on (`torch_dtype` is deprecated there) and
# only `torch_dtype` before it; from_teacher takes `dtype` and hands it on under the installed version's name
FROM_PRETRAINED_DTYPE_KWARG = (
    "dtype" if tuple(int(p) for p in diffusers.__version__.split(".")[:2]) >= (0, 40) else "torch_dtype"
)

# --------------------------------------------------------------------------------------------------
# Parameterization math (the single implementation; fd_onestep.onestep imports it)
# --------------------------------------------------------------------------------------------------
def is_flow_matching_scheduler(scheduler) -> bool:
    """True for flow-matching schedulers: FlowMatchEulerDiscreteScheduler and the like (sigmas, no ``alphas_cumprod``),
    or a DPM-Solver with ``use_flow_sigmas`` (SANA's)."""
    return "FlowMatch" in type(scheduler).__name__ or bool(scheduler.config.get("use_flow_sigmas", False)) or (
        not hasattr(scheduler, "alphas_cumprod") and hasattr(scheduler, "sigmas") and "shift" in scheduler.config
    )


def default_timestep(scheduler) -> int:
    """The top noise level: last DDPM training index (N - 1), or N for flow matching (sigma = 1)."""
    n = int(scheduler.config.num_train_timesteps)
    return n if is_flow_matching_scheduler(scheduler) else n - 1


def flow_sigma(scheduler, timestep: float, image_seq_len: int | None = None, mu: float | None = None) -> float:
    """Flow-matching sigma in [0, 1] at training timestep ``timestep`` (in (0, N]), shifted as the scheduler does.

    Static shift: s' = shift * s / (1 + (shift - 1) s) with s = timestep / N. Dynamic (resolution-dependent)
    shift: the scheduler's ``time_shift(mu, 1, s)`` with ``mu`` as given (a pipeline's own rule, e.g. FLUX.2's
    ``compute_empirical_mu``) or else interpolated from ``image_seq_len`` between (base_image_seq_len, base_shift)
    and (max_image_seq_len, max_shift), as FluxPipeline computes it.
    """
    cfg = scheduler.config
    n = float(cfg.num_train_timesteps)
    if not 0 < timestep <= n:
        raise ValueError(f"flow-matching timestep must be in (0, {int(n)}], got {timestep}.")
    s = torch.tensor(float(timestep) / n, dtype=torch.float64)
    if cfg.get("use_dynamic_shifting", False) and mu is not None:
        s = scheduler.time_shift(mu, 1.0, s)
    elif cfg.get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ValueError("this scheduler uses dynamic shifting: pass image_seq_len (number of latent tokens).")
        m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
        mu = image_seq_len * m + (cfg.base_shift - m * cfg.base_image_seq_len)
        s = scheduler.time_shift(mu, 1.0, s)
    else:
        # FlowMatchEulerDiscreteScheduler: shift; DPM-Solver with flow sigmas: flow_shift
        shift = float(getattr(scheduler, "shift", cfg.get("shift", cfg.get("flow_shift", 1.0))))
        s = shift * s / (1 + (shift - 1) * s)
    return float(s)


def noise_level(scheduler, timestep: int, image_seq_len: int | None = None, mu: float | None = None) -> dict:
    """The noise level of the one step: ``{"kind": "ddpm", "alpha_prod": a}`` or ``{"kind": "flow", "sigma": s}``.

    DDPM-style: ``a = scheduler.alphas_cumprod[timestep]`` (float, exact float64 of the stored value).
    """
    if is_flow_matching_scheduler(scheduler):
        return {"kind": "flow", "sigma": flow_sigma(scheduler, timestep, image_seq_len, mu)}
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(
            f"{type(scheduler).__name__} has neither alphas_cumprod (DDPM-style) nor flow-matching sigmas; use a "
            "DDPM/DDIM/PNDM/Euler-style scheduler or FlowMatchEulerDiscreteScheduler."
        )
    n = len(scheduler.alphas_cumprod)
    if not 0 <= int(timestep) < n:
        raise ValueError(f"timestep must be an int in [0, {n - 1}] for this scheduler, got {timestep}.")
    return {"kind": "ddpm", "alpha_prod": float(scheduler.alphas_cumprod[int(timestep)].double())}


def epsilon_error_amplification(alpha_prod: float) -> float:
    """Factor sqrt(1 - a) / sqrt(a) by which the epsilon -> x0 conversion multiplies the model's error (inf at a=0)."""
    return math.inf if alpha_prod <= 0 else math.sqrt(1.0 - alpha_prod) / math.sqrt(alpha_prod)


def check_one_step_conditioning(prediction_type: str, level: dict, timestep: int, output_bound=None) -> float:
    """Raise where the one-step map is undefined and warn where it is ill-conditioned.

    Returns the error amplification factor of the conversion (1.0 for v / sample / flow).
    Raises ValueError for epsilon prediction at a zero-terminal-SNR top level (a = 0); warns (UserWarning)
    when the epsilon amplification exceeds ``EPSILON_AMPLIFICATION_WARN`` and no ``output_bound`` is set.
    """
    if level["kind"] != "ddpm" or prediction_type != "epsilon":
        return 1.0
    a = level["alpha_prod"]
    if a <= 1e-12:
        raise ValueError(
            f"epsilon prediction is undefined at timestep {timestep}: alphas_cumprod = {a:.3g} (zero terminal SNR), "
            "so x0 = (x_t - sqrt(1-a) eps) / sqrt(a) divides by zero. Use an earlier timestep "
            "(FDOneStepPipeline.from_teacher(..., timestep=600); train_fd_onestep.py --onestep_timestep 600), or a "
            "v-prediction teacher (where x0 = -v at the top)."
        )
    amp = epsilon_error_amplification(a)
    if amp > EPSILON_AMPLIFICATION_WARN and output_bound is None:
        warnings.warn(
            f"ill-conditioned one-step map: epsilon prediction at timestep {timestep} has alphas_cumprod = {a:.3g}, "
            f"so x0 = (x_t - sqrt(1-a) eps) / sqrt(a) amplifies the network's error {amp:.0f}x and one-step outputs "
            "can leave [-1, 1] by far. Fix: use a v-prediction teacher (zero-terminal-SNR betas give x0 = -v), "
            "an earlier timestep (e.g. 600: from_teacher(..., timestep=600); train_fd_onestep.py --onestep_timestep "
            "600), or output_bound='tanh' (train_fd_onestep.py --output_bound tanh).",
            UserWarning,
            stacklevel=3,
        )
    return amp


def prediction_to_sample(
    model_output: torch.Tensor,
    noisy_sample: torch.Tensor,
    prediction_type: str,
    level: dict,
) -> torch.Tensor:
    """Clean-sample estimate x0 from a model output at noise level ``level`` (see :func:`noise_level`).

    Args:
        model_output: (B, C, H, W) epsilon / v / x0 / velocity (already split from learned-sigma channels).
        noisy_sample: (B, C, H, W) the denoiser input x_t (here: the pure noise).
        prediction_type: "epsilon" | "v_prediction" | "sample" | "flow".
    Returns:
        x0 with the dtype of ``model_output``; differentiable in both inputs.
    """
    if prediction_type == "sample":
        return model_output
    if level["kind"] == "flow":
        if prediction_type != "flow":
            raise ValueError(f"flow-matching schedulers take prediction_type 'flow', got {prediction_type!r}.")
        return noisy_sample - level["sigma"] * model_output
    a = level["alpha_prod"]
    if prediction_type == "epsilon":
        if a <= 0:
            raise ValueError("epsilon prediction is undefined where alphas_cumprod = 0; use an earlier timestep.")
        return (noisy_sample - math.sqrt(1.0 - a) * model_output) / math.sqrt(a)
    if prediction_type == "v_prediction":
        return math.sqrt(a) * noisy_sample - math.sqrt(1.0 - a) * model_output
    raise ValueError(
        f"unsupported prediction_type {prediction_type!r}; supported: {DDPM_PREDICTION_TYPES} for DDPM-style "
        f"schedulers and {FLOW_PREDICTION_TYPES} for flow matching."
    )


def apply_output_bound(images: torch.Tensor, output_bound: str | None) -> torch.Tensor:
    """None: identity; "tanh": tanh (smooth, gradients everywhere); "clamp": hard clip to [-1, 1]."""
    if output_bound is None:
        return images
    if output_bound == "tanh":
        return torch.tanh(images)
    if output_bound == "clamp":
        return images.clamp(-1.0, 1.0)
    raise ValueError(f"output_bound must be one of {OUTPUT_BOUNDS}, got {output_bound!r}.")


# --------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------
@dataclass
class OneStepConditioning:
    """Per-sample conditioning of the one step (batch dimension first in every tensor).

    - ``class_labels``: (B,) int64 class ids (class-conditional families).
    - ``prompt_embeds``: (B, L, D) text embeddings ("sd": CLIP hidden states; "sdxl": both CLIPs' joined;
      "sd3": CLIP+T5 joint; "flux": T5; "sana": Gemma-2); ``pooled_prompt_embeds``: (B, P) ("sdxl", "sd3", "flux").
    - ``prompt_attention_mask``: (B, L) int64 token mask ("sana": Gemma-2 padding; "qwenimage" / "zimage": the
      prompt's tokens, right-padded to ``max_sequence_length``).
    - ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds`` / ``negative_prompt_attention_mask``: the
      unconditional branch of guidance.
    """

    class_labels: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    prompt_attention_mask: torch.Tensor | None = None
    negative_prompt_attention_mask: torch.Tensor | None = None

    def _tensors(self):
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __len__(self) -> int:
        tensors = self._tensors()
        return next(iter(tensors.values())).shape[0] if tensors else 0

    def __getitem__(self, index) -> "OneStepConditioning":
        """Rows ``index`` (int, slice or index tensor) of every tensor; for micro-batching."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return replace(self, **{k: v[index] for k, v in self._tensors().items()})

    def new_empty(self, batch_size: int, device=None) -> "OneStepConditioning":
        """Uninitialized conditioning of ``batch_size`` rows: every tensor's row shape and dtype, on ``device``."""
        return replace(self, **{k: v.new_empty((batch_size, *v.shape[1:]), device=device)
                                for k, v in self._tensors().items()})

    def __setitem__(self, index: slice, value: "OneStepConditioning") -> None:
        """Copy ``value``'s rows into rows ``index`` (a slice) of every tensor, in place and across devices."""
        for k, v in self._tensors().items():
            v[index].copy_(getattr(value, k))

    def to(self, device=None, dtype=None) -> "OneStepConditioning":
        """Move to ``device``; ``dtype`` applies to the float embeddings only (labels stay int64)."""
        out = {}
        for k, v in self._tensors().items():
            out[k] = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
        return replace(self, **out)

    def repeat_interleave(self, repeats: int) -> "OneStepConditioning":
        return replace(self, **{k: v.repeat_interleave(repeats, dim=0) for k, v in self._tensors().items()})

    @staticmethod
    def cat(items) -> "OneStepConditioning":
        items = list(items)
        names = items[0]._tensors().keys()
        return OneStepConditioning(**{k: torch.cat([it._tensors()[k] for it in items], dim=0) for k in names})


# --------------------------------------------------------------------------------------------------
# LoRA helpers (PEFT; lazy imports)
# --------------------------------------------------------------------------------------------------
def _has_peft_adapters(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def add_lora_to_denoiser(
    denoiser: torch.nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
    adapter_name: str = "default",
    init_lora_weights: bool | str = True,
) -> torch.nn.Module:
    """Freeze the denoiser and add a trainable PEFT LoRA adapter to it (in place; returns it).

    ``target_modules``: PEFT module-name suffixes; default ``DEFAULT_LORA_TARGETS[family]``.
    ``alpha`` defaults to ``rank`` (scale 1). Models with diffusers' ``PeftAdapterMixin`` use
    ``add_adapter`` (families with a diffusers LoRA loader); UNet2DModel and DiT use ``peft.inject_adapter_in_model``.
    """
    from peft import LoraConfig

    adapter = adapter_of_denoiser(denoiser)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=list(target_modules or adapter.default_lora_targets),
        init_lora_weights=init_lora_weights,
    )
    denoiser.requires_grad_(False)
    adapter.add_lora(denoiser, config, adapter_name)
    return denoiser


def _peft_configs(model) -> dict:
    if not isinstance(getattr(model, "peft_config", None), dict):
        # nn.Module.__setattr__ keeps plain dicts as attributes
        model.peft_config = {}
    return model.peft_config


def denoiser_lora_state_dict(denoiser: torch.nn.Module, adapter_name: str = "default") -> dict:
    """PEFT state dict (``<module>.lora_A.weight`` ...) of one adapter, unwrapped from DDP/compile wrappers.

    Tensors are contiguous (the same values): a convolution LoRA of a denoiser in ``channels_last`` memory format
    has ``channels_last`` weights, which safetensors refuses to write.
    """
    from accelerate.utils import extract_model_from_parallel
    from peft import get_peft_model_state_dict

    denoiser = extract_model_from_parallel(denoiser, keep_torch_compile=False)
    if not _has_peft_adapters(denoiser):
        raise ValueError("the denoiser has no LoRA adapter; add one with add_lora_to_denoiser(...) before saving.")
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(denoiser, adapter_name=adapter_name).items()}


# --------------------------------------------------------------------------------------------------
# Model families: one adapter class each (see docs/adding_a_family.md)
# --------------------------------------------------------------------------------------------------
class FamilyAdapter:
    """Everything that differs between model families, for one ``FDOneStepPipeline`` (``pipe.adapter``).

    Class attributes describe the family; classmethods detect and check it before a pipeline exists; methods of
    an instance (bound to its pipeline as ``self.pipe``) encode the conditioning, call the denoiser, decode and
    describe the stock pipeline's one step. The one-step math (``noise_level``, ``prediction_to_sample``) and the
    classifier-free-guidance combination are shared and live outside the adapters.
    """

    name: str = ""
    denoiser_slot: str = "transformer"  # "unet" | "transformer": the pipeline component that holds the denoiser
    denoiser_class: type = None
    is_latent: bool = True
    conditioning: str = "text"  # "text" | "class" | "class-or-none"
    lora_loader: str | None = None  # diffusers LoRA loader mixin (in diffusers.loaders); None: PEFT directly
    default_lora_targets: tuple = ("to_q", "to_k", "to_v", "to_out.0")
    stock_pipeline: str | None = None  # the stock diffusers pipeline that takes the same one step
    flow_matching_only: bool = False
    default_max_sequence_length: int | None = None
    # (components, what they are or None) the family cannot do without; the error names the family and them
    required_components: tuple = ()
    # the denoiser's repeated blocks, each its own FSDP2 unit under sharded training (fd_onestep.training.sharding);
    # None: the model class's own ``_no_split_modules`` (diffusers names its blocks there)
    block_classes: tuple | None = None

    def __init__(self, pipe: "FDOneStepPipeline"):
        self.pipe = pipe

    # ---------------------------------------------------------------- detection (no pipeline yet)
    @classmethod
    def describe(cls) -> str:
        return f"{cls.name} ({cls.denoiser_class.__name__})"

    @classmethod
    def owns_denoiser(cls, denoiser) -> bool:
        """This family's denoiser (the model class, and the variant of it where one class serves two families)."""
        return isinstance(denoiser, cls.denoiser_class)

    @classmethod
    def owns_model_index(cls, config: dict) -> bool:
        """Whether a teacher's ``model_index.json`` is one of this family's pipelines."""
        entry = config.get(cls.denoiser_slot)
        return isinstance(entry, (list, tuple)) and entry[1] == cls.denoiser_class.__name__

    @classmethod
    def check_model_index(cls, config: dict, source) -> None:
        """Raise for a pipeline of this family that the one step cannot take (e.g. an img2img variant)."""

    @classmethod
    def check_components(cls, denoiser, components: dict) -> None:
        if cls.is_latent and components.get("vae") is None:
            raise ValueError(f"the {cls.name!r} family is a latent model: pass its `vae`.")
        for names, what in cls.required_components:
            if any(components.get(n) is None for n in names):
                passed = " and ".join(f"`{n}`" for n in names)
                raise ValueError(f"the {cls.name!r} family needs {what}: pass {passed}." if what
                                 else f"the {cls.name!r} family needs {passed}.")

    @classmethod
    def resolve_settings(cls, denoiser, scheduler, settings: dict) -> dict:
        """Fill in the family defaults of the pipeline config (``sample_size``, ``max_sequence_length``, ...)."""
        if settings["sample_size"] is None:
            cfg_size = cls.default_sample_size(denoiser)
            if cfg_size is None:
                raise ValueError("the denoiser config has no sample_size; pass `sample_size=` (generator input side).")
            settings["sample_size"] = cfg_size if isinstance(cfg_size, int) else int(cfg_size[0])
        if settings["max_sequence_length"] is None:
            settings["max_sequence_length"] = cls.default_max_sequence_length
        settings["is_distilled"] = None  # a setting of step-distilled families only
        return settings

    @classmethod
    def default_sample_size(cls, denoiser):
        return denoiser.config.get("sample_size", None)

    # ---------------------------------------------------------------- shapes
    @property
    def denoiser(self):
        return getattr(self.pipe, self.denoiser_slot)

    def vae_scale_factor(self) -> int:
        vae = getattr(self.pipe, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    def noise_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    def image_channels(self) -> int:
        return int(self.pipe.vae.config.out_channels)

    def image_seq_len(self) -> int | None:
        """Latent tokens of one sample, for resolution-dependent flow shifts (None: not used)."""
        return None

    def flow_shift_mu(self) -> float | None:
        """mu of a dynamic flow shift where the stock pipeline computes it its own way (None: the scheduler's rule)."""
        return None

    def num_classes(self) -> int | None:
        return None

    def frozen_component_names(self) -> list[str]:
        names = ["vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
        return [n for n in names if getattr(self.pipe, n, None) is not None]

    def float32_component_names(self) -> list[str]:
        """Frozen components that stay in float32 under mixed precision (e.g. a VAE that overflows in fp16)."""
        return []

    # ---------------------------------------------------------------- conditioning
    def uses_negative_branch(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0

    def default_negative_prompt(self):
        return ""

    def encode_prompts(self, prompts, negative_prompts, guided, num_images_per_prompt, device):
        raise ValueError(f"the {self.name!r} family takes no prompt.")

    def example_conditioning(self, batch_size, device, dtype, guided) -> "OneStepConditioning | None":
        return None

    # ---------------------------------------------------------------- the denoiser
    def flow_timestep_dtype(self, dtype):
        """dtype of a flow-matching timestep as the stock pipeline passes it (StableDiffusion3Pipeline: float32;
        a bf16 timestep near 1000 is rounded to a multiple of 4)."""
        return torch.float32

    def denoise(self, denoiser, x, t, cond, use_negative: bool, guidance_scale: float, dtype):
        """Raw output of ``denoiser`` on ``x`` (B', C, h, w) at timesteps ``t`` (B',), conditioned on ``cond``
        (its negative rows appended when ``use_negative``), in the unpacked latent / pixel layout."""
        raise NotImplementedError

    def combine_guidance(self, cond_out: torch.Tensor, uncond_out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance of the two branches' outputs (unpacked layout): ``uncond + g (cond - uncond)``;
        a family whose stock pipeline does more (a rescale) adds it here."""
        return uncond_out + guidance_scale * (cond_out - uncond_out)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> images (B, C, H, W) float32, nominally in [-1, 1] (differentiable)."""
        vae = self.pipe.vae
        cfg = vae.config
        latents = latents / cfg.scaling_factor
        if cfg.get("shift_factor", None) is not None:
            latents = latents + cfg.shift_factor
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()

    # ---------------------------------------------------------------- the stock pipeline's one step
    def stock_scheduler(self):
        """(scheduler, overrides) of the stock flow-matching one step: the teacher's own by default."""
        return self.pipe.scheduler, {}

    def stock_call_kwargs(self, kwargs: dict, guidance_scale: float) -> dict:
        if self.conditioning == "text":
            kwargs["guidance_scale"] = guidance_scale
        return kwargs

    # ---------------------------------------------------------------- LoRA
    @classmethod
    def lora_mixin(cls):
        import diffusers.loaders as loaders

        return getattr(loaders, cls.lora_loader)

    @classmethod
    def add_lora(cls, denoiser, config, adapter_name):
        from peft import inject_adapter_in_model

        if cls.lora_loader is not None and hasattr(denoiser, "add_adapter"):
            denoiser.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
            _peft_configs(denoiser)[adapter_name] = config

    def _lora_state_dict(self, mixin, source, weight_name, **kwargs):
        """(state dict, network alphas or None, metadata) through the loader mixin."""
        state_dict, metadata = mixin.lora_state_dict(source, weight_name=weight_name, return_lora_metadata=True,
                                                     **kwargs)
        return state_dict, None, metadata

    def _load_lora_into_denoiser(self, mixin, state_dict, alphas, metadata, adapter_name):
        mixin.load_lora_into_transformer(state_dict, transformer=self.denoiser, adapter_name=adapter_name,
                                         _pipeline=self.pipe, metadata=metadata)

    def load_lora(self, source, adapter_name, weight_name=None, **kwargs):
        prefix = self.denoiser_slot
        if self.lora_loader is None:
            state_dict, config = _read_peft_lora(source, weight_name, **kwargs)
            _load_peft_lora(self.denoiser, state_dict, config, prefix, adapter_name)
            return
        mixin = self.lora_mixin()
        state_dict, alphas, metadata = self._lora_state_dict(mixin, source, weight_name, **kwargs)
        ignored = [k for k in state_dict if not k.startswith(prefix + ".")]
        if ignored and len(ignored) < len(state_dict):
            logger.warning(f"ignoring {len(ignored)} LoRA weights outside `{prefix}` (e.g. {ignored[0]}).")
            state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
        self._load_lora_into_denoiser(mixin, state_dict, alphas, metadata, adapter_name)

    @classmethod
    def save_lora(cls, save_directory, layers: dict, meta, weight_name, is_main_process, safe_serialization) -> str:
        prefix = cls.denoiser_slot
        if cls.lora_loader is not None:
            cls.lora_mixin().save_lora_weights(
                save_directory, is_main_process=is_main_process, weight_name=weight_name,
                safe_serialization=safe_serialization,
                **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": meta},
            )
            return os.path.join(save_directory, weight_name)
        if not is_main_process:
            return os.path.join(save_directory, weight_name)
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        tensors = {f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in layers.items()}
        metadata = {"format": "pt"}
        if meta is not None:
            # as diffusers' LoRA writers do: the config keys prefixed with the component name
            metadata[LORA_METADATA_KEY] = json.dumps({f"{prefix}.{k}": v for k, v in meta.items()}, indent=2,
                                                     sort_keys=True)
        path = os.path.join(save_directory, weight_name)
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
        return path


def _example_tensor(shape, dtype, device, dtype_override=None):
    """Random values of the exact shape and dtype (``dtype_override`` for float tensors); meta / fake ready."""
    if dtype_override is not None and dtype.is_floating_point:
        dtype = dtype_override
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.ones(shape, dtype=dtype, device=device)


def _module_dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def _module_device(module) -> torch.device:
    return next(module.parameters()).device


# ------------------------------------------------------------------ class-conditional / unconditional pixels and DiT
class _ClassFamilyAdapter(FamilyAdapter):
    stock_pipeline = None

    def class_labels(self, cond, use_negative, device):
        if not self.pipe.is_class_conditional:
            if use_negative:
                raise ValueError("guidance needs a conditional model; this one is unconditional: use guidance_scale=1.")
            return None
        if cond is None or cond.class_labels is None:
            raise ValueError("class-conditional model: conditioning.class_labels is required.")
        labels = cond.class_labels.to(device)
        if use_negative:
            if self.pipe.config.null_class_label is None:
                raise ValueError(
                    "guidance needs an unconditional class: set `null_class_label` in the pipeline config "
                    "(the label the model was trained with for dropped conditioning), or guidance_scale=1."
                )
            labels = torch.cat([labels, torch.full_like(labels, self.pipe.config.null_class_label)])
        return labels

    def example_conditioning(self, batch_size, device, dtype, guided):
        if self.num_classes() is None:
            return None
        device = device if device is not None else _module_device(self.denoiser)
        return OneStepConditioning(class_labels=torch.zeros(batch_size, dtype=torch.long, device=device))


class UNet2DAdapter(_ClassFamilyAdapter):
    """Pixel-space ``UNet2DModel`` (``DDPMPipeline``), unconditional or class-conditional."""

    name = "unet2d"
    denoiser_slot = "unet"
    denoiser_class = UNet2DModel
    is_latent = False
    conditioning = "class-or-none"
    default_lora_targets = ("conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0")
    stock_pipeline = "DDPMPipeline"
    block_classes = ("ResnetBlock2D", "Attention")  # UNet2DModel has no _no_split_modules

    @classmethod
    def resolve_settings(cls, denoiser, scheduler, settings):
        settings = super().resolve_settings(denoiser, scheduler, settings)
        null_class_label = settings["null_class_label"]
        if null_class_label is not None:
            # a UNet2DModel's class table has num_class_embeds rows; the null class must be the last one, so the
            # real classes are 0 .. num_class_embeds - 2 (DiT's convention: its null label is num_classes)
            num_embeds = denoiser.config.get("num_class_embeds")
            if num_embeds is None or int(null_class_label) != int(num_embeds) - 1:
                raise ValueError(
                    f"null_class_label={null_class_label} for a UNet2DModel with num_class_embeds={num_embeds}: the "
                    "null class (the label of dropped conditioning in training) must be the last class embedding, "
                    f"{None if num_embeds is None else int(num_embeds) - 1}; omit it for a model trained without one."
                )
        return settings

    def image_channels(self):
        return int(self.denoiser.config.out_channels)

    def num_classes(self):
        cfg = self.denoiser.config
        if cfg.get("num_class_embeds") is None:
            return None
        # with a null class (the last embedding, see resolve_settings) the real classes are the ones before it
        return int(cfg.num_class_embeds) - (self.pipe.config.null_class_label is not None)

    def denoise(self, denoiser, x, t, cond, use_negative, guidance_scale, dtype):
        labels = self.class_labels(cond, use_negative, x.device)
        return denoiser(x, t, class_labels=labels, return_dict=False)[0]


class DiTAdapter(_ClassFamilyAdapter):
    """Class-conditional latent ``DiTTransformer2DModel`` (``DiTPipeline``)."""

    name = "dit"
    denoiser_class = DiTTransformer2DModel
    conditioning = "class"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    block_classes = ("BasicTransformerBlock",)  # DiTTransformer2DModel has no _no_split_modules

    @classmethod
    def owns_model_index(cls, config):
        # the published DiT repositories (facebook/DiT-XL-2-256, -512; converted before diffusers 0.28) name the
        # legacy `Transformer2DModel`, which diffusers loads as a DiTTransformer2DModel (norm_type ada_norm_zero)
        entry = config.get(cls.denoiser_slot)
        return super().owns_model_index(config) or (
            config.get("_class_name") == "DiTPipeline" and isinstance(entry, (list, tuple))
            and entry[1] == "Transformer2DModel")

    @classmethod
    def resolve_settings(cls, denoiser, scheduler, settings):
        settings = super().resolve_settings(denoiser, scheduler, settings)
        if settings["null_class_label"] is None:
            settings["null_class_label"] = int(denoiser.config.num_embeds_ada_norm)
        return settings

    def num_classes(self):
        return int(self.denoiser.config.num_embeds_ada_norm)

    def denoise(self, denoiser, x, t, cond, use_negative, guidance_scale, dtype):
        labels = self.class_labels(cond, use_negative, x.device)
        return denoiser(x, timestep=t, class_labels=labels, return_dict=False)[0]


# ------------------------------------------------------------------ text-to-image
class _TextFamilyAdapter(FamilyAdapter):
    """Prompts encoded by the stock pipeline's own ``encode_prompt`` over this pipeline's text components."""

    stock_pipeline_class: type = None
    text_components: tuple = ()  # what the stock pipeline's encode_prompt reads

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # the stock pipeline that encodes the prompts is the one that takes the same one step
        if cls.stock_pipeline_class is not None:
            cls.stock_pipeline = cls.stock_pipeline_class.__name__

    def prompt_token_counts(self, prompts: list[str]) -> list[int] | None:
        """Tokens of each prompt as the stock pipeline tokenizes it against ``max_sequence_length``, its prompt
        template included (untruncated); None where the tokenizer reads the prompt alone."""
        return None

    def stock_text_pipeline(self) -> DiffusionPipeline:
        """The stock diffusers pipeline of this family over this pipeline's own text components (shared, not copied).

        Built once and rebuilt only when one of the components it holds is replaced.
        """
        parts = {name: getattr(self.pipe, name) for name in self.text_components}
        stock = getattr(self.pipe, "_stock_text", None)
        if stock is None or type(stock) is not self.stock_pipeline_class or any(
            getattr(stock, k) is not v for k, v in parts.items()
        ):
            stock = self.build_stock_text_pipeline(parts)
            self.pipe._stock_text = stock
        return stock

    def build_stock_text_pipeline(self, parts: dict) -> DiffusionPipeline:
        return self.stock_pipeline_class(**parts, vae=None, scheduler=None)

    def text_inputs(self, cond, use_negative, device, dtype, names=("prompt_embeds", "pooled_prompt_embeds")):
        """The conditioning tensors ``names`` (their negative rows appended when ``use_negative``) on ``device``;
        float ones in the denoiser's ``dtype``."""
        if cond is None or cond.prompt_embeds is None:
            raise ValueError(
                f"the {self.name!r} family needs prompt embeddings: build them with encode_conditioning(prompt=...)."
            )
        if use_negative and cond.negative_prompt_embeds is None:
            raise ValueError(
                "guidance_scale > 1 needs negative prompt embeddings: build the conditioning with "
                "encode_conditioning(..., guidance_scale=<same value>)."
            )
        out = []
        for name in names:
            value = getattr(cond, name)
            if value is not None and use_negative:
                value = torch.cat([value, getattr(cond, "negative_" + name)])
            if value is not None:
                value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
            out.append(value)
        return out

    def stock_call_kwargs(self, kwargs, guidance_scale):
        # only where the stock pipeline takes it (a max_sequence_length given for an SD / SDXL teacher is unused)
        takes_length = "max_sequence_length" in inspect.signature(self.stock_pipeline_class.__call__).parameters
        if self.pipe.config.max_sequence_length is not None and takes_length:
            kwargs["max_sequence_length"] = int(self.pipe.config.max_sequence_length)
        kwargs["guidance_scale"] = guidance_scale
        return kwargs


class SDAdapter(_TextFamilyAdapter):
    """Stable Diffusion 1.x / 2.x: ``UNet2DConditionModel`` without added embeddings, one CLIP text encoder."""

    name = "sd"
    denoiser_slot = "unet"
    denoiser_class = UNet2DConditionModel
    lora_loader = "StableDiffusionLoraLoaderMixin"
    stock_pipeline_class = StableDiffusionPipeline
    text_components = ("text_encoder", "tokenizer")
    required_components = ((("text_encoder", "tokenizer"), None),)

    @classmethod
    def owns_denoiser(cls, denoiser):
        return super().owns_denoiser(denoiser) and getattr(denoiser.config, "addition_embed_type", None) is None

    @classmethod
    def owns_model_index(cls, config):
        return super().owns_model_index(config) and config.get("text_encoder_2") in (None, [None, None])

    def build_stock_text_pipeline(self, parts):
        # only what encode_prompt reads. No scheduler and no UNet: StableDiffusionPipeline's constructor rewrites
        # legacy scheduler / UNet configs in place (steps_offset, clip_sample, sample_size)
        return self.stock_pipeline_class(**parts, vae=None, unet=None, scheduler=None, safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)

    def encode_prompts(self, prompts, negative_prompts, guided, num_images_per_prompt, device):
        stock = self.stock_text_pipeline()
        embeds, negative = stock.encode_prompt(prompts, device, num_images_per_prompt, guided, negative_prompts)
        return OneStepConditioning(prompt_embeds=embeds, negative_prompt_embeds=negative)

    def example_conditioning(self, batch_size, device, dtype, guided):
        te = self.pipe.text_encoder
        device = device if device is not None else _module_device(te)
        shape = (batch_size, self._token_length(), int(te.config.hidden_size))
        embeds = _example_tensor(shape, _module_dtype(te), device, dtype)
        return OneStepConditioning(prompt_embeds=embeds,
                                   negative_prompt_embeds=torch.randn_like(embeds) if guided else None)

    def _token_length(self) -> int:
        tokenizer = self.pipe.tokenizer
        if tokenizer is not None:
            return int(tokenizer.model_max_length)
        return int(self.pipe.text_encoder.config.max_position_embeddings)

    def _lora_state_dict(self, mixin, source, weight_name, **kwargs):
        return mixin.lora_state_dict(source, weight_name=weight_name, return_lora_metadata=True, **kwargs)

    def _load_lora_into_denoiser(self, mixin, state_dict, alphas, metadata, adapter_name):
        mixin.load_lora_into_unet(state_dict, alphas, unet=self.denoiser, adapter_name=adapter_name,
                                  _pipeline=self.pipe, metadata=metadata)

    def denoise(self, denoiser, x, t, cond, use_negative, guidance_scale, dtype):
        (embeds,) = self.text_inputs(cond, use_negative, x.device, dtype, names=("prompt_embeds",))
        return denoiser(x, t, encoder_hidden_states=embeds, return_dict=False)[0]


class SDXLAdapter(SDAdapter):
    """Stable Diffusion XL (base, text-to-image): ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``,
    two CLIP text encoders (pooled embeddings of the second), micro-conditioning time ids."""

    name = "sdxl"
    lora_loader = "StableDiffusionXLLoraLoaderMixin"
    stock_pipeline_class = StableDiffusionXLPipeline
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "unet")
    required_components = ((("text_encoder_2", "tokenizer_2"), "its second text encoder"),)
    # the only ones the stock text-to-image pipeline takes
    IMG2IMG_PIPELINES = ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
                         "StableDiffusionXLInstructPix2PixPipeline")

    @classmethod
    def describe(cls):
        return f"{cls.name} ({cls.denoiser_class.__name__} with addition_embed_type='text_time')"

    @classmethod
    def owns_denoiser(cls, denoiser):
        return isinstance(denoiser, cls.denoiser_class) and getattr(denoiser.config, "addition_embed_type",
                                                                     None) == "text_time"

    @classmethod
    def owns_model_index(cls, config):
        return FamilyAdapter.owns_model_index.__func__(cls, config) and (
            config.get("text_encoder_2") not in (None, [None, None])
            or str(config.get("_class_name", "")).startswith("StableDiffusionXL")
        )

    @classmethod
    def check_model_index(cls, config, source):
        name = config.get("_class_name")
        if name in cls.IMG2IMG_PIPELINES or config.get("requires_aesthetics_score") or config.get(
            "text_encoder"
        ) in (None, [None, None]):
            raise ValueError(
                f"{source} is a {name} (an SDXL refiner or image-to-image pipeline); one-step generation supports "
                "SDXL base text-to-image teachers (StableDiffusionXLPipeline, e.g. "
                "stabilityai/stable-diffusion-xl-base-1.0)."
            )

    @classmethod
    def check_components(cls, denoiser, components):
        super().check_components(denoiser, components)
        if components.get("text_encoder") is None or components.get("tokenizer") is None:
            raise ValueError(
                "an SDXL UNet without `text_encoder` / `tokenizer` is the SDXL refiner (an img2img model with "
                "aesthetic-score conditioning), which one-step text-to-image does not support: use the SDXL base model."
            )
        cfg = denoiser.config
        expected = int(cfg.addition_time_embed_dim) * 6 + int(components["text_encoder_2"].config.projection_dim)
        if cfg.projection_class_embeddings_input_dim != expected:
            raise ValueError(
                f"this SDXL UNet takes added embeddings of {cfg.projection_class_embeddings_input_dim} values, not "
                f"6 time ids x {cfg.addition_time_embed_dim} + the pooled text embedding ({expected}): it is not an "
                "SDXL base text-to-image UNet (the refiner takes 5 time ids with an aesthetic score); use the SDXL "
                "base model."
            )

    @classmethod
    def resolve_settings(cls, denoiser, scheduler, settings):
        settings = super().resolve_settings(denoiser, scheduler, settings)
        if settings["force_zeros_for_empty_prompt"] is None:
            settings["force_zeros_for_empty_prompt"] = True  # StableDiffusionXLPipeline's default
        return settings

    def float32_component_names(self):
        vae = self.pipe.vae
        return ["vae"] if vae is not None and vae.config.get("force_upcast", False) else []

    def build_stock_text_pipeline(self, parts):
        # the UNet is read by _get_add_time_ids (the stock micro-conditioning); no scheduler, no VAE, no watermark
        return self.stock_pipeline_class(**parts, vae=None, scheduler=None, add_watermarker=False,
                                         force_zeros_for_empty_prompt=bool(
                                             self.pipe.config.force_zeros_for_empty_prompt))

    def default_negative_prompt(self):
        # as StableDiffusionXLPipeline: no negative prompt -> zeros when force_zeros_for_empty_prompt, else ""
        return None

    def encode_prompts(self, prompts, negative_prompts, guided, num_images_per_prompt, device):
        stock = self.stock_text_pipeline()
        embeds, negative, pooled, negative_pooled = stock.encode_prompt(
            prompts, device=device, num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=guided,
            negative_prompt=negative_prompts,
        )
        return OneStepConditioning(prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                                   negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)

    def _token_length(self):
        return int(self.pipe.tokenizer_2.model_max_length)

    def example_conditioning(self, batch_size, device, dtype, guided):
        te, te2 = self.pipe.text_encoder, self.pipe.text_encoder_2
        device = device if device is not None else _module_device(te2)
        width = int(te.config.hidden_size) + int(te2.config.hidden_size)
        embeds = _example_tensor((batch_size, self._token_length(), width), _module_dtype(te2), device, dtype)
        pooled = _example_tensor((batch_size, int(te2.config.projection_dim)), _module_dtype(te2), device, dtype)
        return OneStepConditioning(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled,
            negative_prompt_embeds=torch.randn_like(embeds) if guided else None,
            negative_pooled_prompt_embeds=torch.randn_like(pooled) if guided else None,
        )

    def add_time_ids(self, dtype, device, rows) -> torch.Tensor:
        """The stock micro-conditioning: original size = target size = the generated size, crop (0, 0)."""
        size = int(self.pipe.config.sample_size) * self.pipe.vae_scale_factor
        ids = self.stock_text_pipeline()._get_add_time_ids(
            (size, size), (0, 0), (size, size), dtype=dtype,
            text_encoder_projection_dim=int(self.pipe.text_encoder_2.config.projection_dim),
        )
        return ids.to(device).repeat(rows, 1)

    def denoise(self, denoiser, x, t, cond, use_negative, guidance_scale, dtype):
        embeds, pooled = self.text_inputs(cond, use_negative, x.device, dtype)
        added = {"text_embeds": pooled, "time_ids": self.add_time_ids(embeds.dtype, x.device, x.shape[0])}
        return denoiser(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

    def decode(self, latents):
        vae = self.pipe.vae
        device_type = latents.device.type
        in_fp16 = vae.dtype == torch.float16 or (
            torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
        )
        if not (in_fp16 and vae.config.get("force_upcast", False)):
            return self._decode(latents)
        # as StableDiffusionXLPipeline: this VAE overflows in float16 (NaN images), so it decodes in float32, also
        # under an fp16 mixed-precision autocast (the training script's generator runs under one)
        if vae.dtype != torch.float32:
            logger.info("the VAE has force_upcast=True: it is kept in float32 for decoding.")
            vae.to(dtype=torch.float32)
        with torch.autocast(device_type, enabled=False):
            return self._decode(latents.float())

    def _decode(self, latents):
        vae = self.pipe.vae
        cfg = vae.config
        if cfg.get("latents_mean", None) is not None and cfg.get("latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / cfg.scaling_factor + mean
            return vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()
        return super().decode(latents)


class SD3Adapter(_TextFamilyAdapter):
    """Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel``, two CLIP encoders and an optional T5, flow matching."""

    name = "sd3"
    denoiser_class = SD3Transformer2DModel
    lora_loader = "SD3LoraLoaderMixin"
    stock_pipeline_class = StableDiffusion3Pipeline
    text_components = ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                       "tokenizer_3")
    flow_matching_only = True
    default_max_sequence_length = 256
    required_components = ((("text_encoder", "tokenizer"), None),
                           (("text_encoder_2", "tokenizer_2"), "both CLIP encoders"))

    def encode_prompts(self, prompts, negative_prompts, guided, num_images_per_prompt, device):
        embeds, negative, pooled, negative_pooled = self.stock_text_pipeline().encode_prompt(
            prompts, None, None, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=guided, negative_prompt=negative_prompts,
            max_sequence_length=self.pipe.config.max_sequence_length,
        )
        return OneStepConditioning(prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                                   negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)

    def example_conditioning(self, batch_size, device, dtype, guided):
        p = self.pipe
        te, te2, te3 = p.text_encoder, p.text_encoder_2, p.text_encoder_3
        device = device if device is not None else _module_device(te)
        clip_length = int(p.tokenizer.model_max_length) if p.tokenizer is not None else 77
        length = clip_length + int(p.config.max_sequence_length)
        # CLIP states in the first encoder's dtype; T5's (or its zeros, in the CLIP dtype) joined to them
        t5_dtype = _module_dtype(te3) if te3 is not None else _module_dtype(te)
        embeds_dtype = torch.promote_types(_module_dtype(te), t5_dtype)
        pooled_dtype = torch.promote_types(_module_dtype(te), _module_dtype(te2))
        width = int(p.transformer.config.joint_attention_dim)
        pooled_width = int(te.config.projection_dim) + int(te2.config.projection_dim)
        embeds = _example_tensor((batch_size, length, width), embeds_dtype, device, dtype)
        pooled = _example_tensor((batch_size, pooled_width), pooled_dtype, device, dtype)
        return OneStepConditioning(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled,
            negative_prompt_embeds=torch.randn_like(embeds) if guided else None,
            negative_pooled_prompt_embeds=torch.randn_like(pooled) if guided else None,
        )

    def denoise(self, denoiser, x, t, cond, use_negative, guidance_scale, dtype):
        embeds, pooled = self.text_inputs(cond, use_negative, x.device, dtype)
        return denoiser(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                        return_dict=False)[0]


class FluxAdapter(_TextFamilyAdapter):
    """FLUX.1: ``FluxTransformer2DModel`` on packed 2x2 latent patches, CLIP (pooled) + T5, flow matching with a
    resolution-dependent shift; guidance-distilled models take the guidance scale as an embedding."""

    name = "flux"
    denoiser_class = FluxTransformer2DModel
    lora_loader = "FluxLoraLoaderMixin"
    stock_pipeline_class = FluxPipeline
    text_components = ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    flow_matching_only = True
    default_max_sequence_length = 512
    required_components = ((("text_encoder", "tokenizer"), None),
                           (("text_encoder_2", "tokenizer_2"), "the T5 encoder"))

    @classmethod
    def default_sample_size(cls, denoiser):
        return 128  # FluxPipeline.default_sample_size (latent pixels)

    def noise_channels(self):
        return int(self.denoiser.config.in_channels) // 4

    def image_seq_len(self):
        return (self.pipe.config.sample_size // 2) ** 2

    def uses_negative_branch(self, guidance_scale):
        return guidance_scale > 1.0 and not self.pipe.transformer.config.guidance_embeds

    def encode_prompts(self, prompts, negative_prompts, guided, num_images_per_prompt, device):
        # encode_prompt has no negative branch; FluxPipeline encodes its true-CFG negative prompt with a second
        # call, as here
        stock = self.stock_text_pipeline()
        length = self.pipe.config.max_sequence_length
        embeds, pooled, _ = stock.encode_prompt(prompts, device=device, num_images_per_prompt=num_images_per_prompt,
                                                max_sequence_length=length)
        cond = OneStepConditioning(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        if guided:
            negative, negative_pooled, _ = stock.encode_prompt(
                negative_prompts, device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=length
            )
            cond = replace(cond, negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        return cond

    def example_conditioning(self, batch_size, device, dtype, guided):
        te, te2 = self.pipe.text_encoder, self.pipe.text_encoder_2
        device = device if device is not None else _module_device(te)
        length = int(self.pipe.config.max_sequence_length)
        embeds = _example_tensor((batch_size, length, int(te2.config.d_model)), _module_dtype(te2), device, dtype)
        pooled = _example_tensor((batch_size, int(te.config.hidden_size)), _module_dtype(te), device, dtype)
        return OneStepConditioning(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled,
            negative_prompt_embeds=torch.randn_like(embeds) if guided else None,
            negative_pooled_prompt_embeds=torch.randn_like(pooled) if guided else None,
        )

    def flow_timestep_dtype(self, dtype):
        return dtype  # FluxPipeline passes it in the latents' dtype

    def _lora_state_dict(self, mixin, source, weight_name, **kwargs):
        return mixin.lora_state_dict(source, weight_name=weight_name, return_alphas=True, return_lora_metadata=True,
                                     **kwargs)

    def _load_lora_into_denoiser(self, mixin, state_dict, alphas, metadata, adapter_name):
        mixin.load_lora_into_transformer(state_dict, alphas, transformer=self.denoiser, adapter_name=adapter_name,
                                         metadata=metadata, _pipeline=self.pipe)

    def denoise(self, denoiser, x, t, cond, use_negative, guidance_scale, dtype):
        embeds, pooled = self.text_inputs(cond, use_negative, x.device, dtype)
        n, c, h, w = x.shape
        vsf = self.pipe.vae_scale_factor
        packed = FluxPipeline._pack_latents(x, n, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x.device, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full((n,), guidance_scale, device=x.device, dtype=torch.float32)
        out = denoiser(
            hidden_states=packed, timestep=t / self.pipe.scheduler.config.num_train_timesteps, guidance=guidance,
            pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, h * vsf, w * vsf, vsf)

    def stock_call_kwargs(self, kwargs, guidance_scale):
        kwargs = super().stock_call_kwargs(kwargs, guidance_scale)
        if not self.pipe.transformer.config.guidance_embeds:
            del kwargs["guidance_scale"]
            if guidance_scale > 1:
                kwargs.update(true_cfg_scale=guidance_scale, negative_prompt="")
        return kwargs


class SanaAdapter(_TextFamilyAdapter):
    """SANA: ``SanaTransformer2DModel``, a Gemma-2 text encoder (with SanaPipeline's complex human instruction and
    attention mask), ``AutoencoderDC`` (32x), flow matching (``DPMSolverMultistepScheduler`` with flow sigmas)."""

    name = "sana"
    denoiser_class = SanaTransformer2DModel
    lora_loader = "SanaLoraLoaderMixin"
    stock_pipeline_class = SanaPipeline
    text_components = ("text_encoder", "tokenizer")
    flow_matching_only = True
    required_components = ((("text_encoder", "tokenizer"), None),)

    @staticmethod
    def stock_call_default(name):
        return inspect.signature(SanaPipeline.__call__).parameters[name].default

    @classmethod
    def check_model_index(cls, config, source):
        name = str(config.get("_class_name", ""))
        if "Sprint" in name or "ControlNet" in name or "Video" in name:
            raise ValueError(
                f"{source} is a {name}; one-step FD distillation supports SANA text-to-image teachers "
                "(SanaPipeline, e.g. Efficient-Large-Model/Sana_1600M_1024px_diffusers), which its stock "
                "pipeline samples with flow matching."
            )

    @classmethod
    def resolve_settings(cls, denoiser, scheduler, settings):
        if settings["max_sequence_length"] is None:
            settings["max_sequence_length"] = int(cls.stock_call_default("max_sequence_length"))
        settings = super().resolve_settings(denoiser, scheduler, settings)
        if settings["complex_human_instruction"] is None:
            settings["complex_human_instruction"] = list(cls.stock_call_default("complex_human_instruction"))
        return settings

    def vae_scale_factor(self):
        return 2 ** (len(self.pipe.vae.config.encoder_block_out_channels) - 1)

    def image_channels(self):
        return int(self.pipe.vae.config.in_channels)

    def build_stock_text_pipeline(self, parts):
        return self.stock_pipeline_class(**parts, vae=None, transformer=None, scheduler=None)

    def encode_prompts(self, prompts, negative_prompts, guided, num_images_per_prompt, device):
        # one row per prompt, then repeated here: SanaPipeline.encode_prompt repeats the embeddings per prompt but
        # its attention masks prompt after prompt, which pairs masks with the wrong prompts when n > 1
        embeds, mask, negative, negative_mask = self.stock_text_pipeline().encode_prompt(
            prompts, do_classifier_free_guidance=guided, negative_prompt=negative_prompts, num_images_per_prompt=1,
            device=device, clean_caption=False, max_sequence_length=int(self.pipe.config.max_sequence_length),
            complex_human_instruction=self.pipe.config.complex_human_instruction or None,
        )
        cond = OneStepConditioning(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                                   negative_prompt_attention_mask=negative_mask)
        return cond.repeat_interleave(num_images_per_prompt)

    def example_conditioning(self, batch_size, device, dtype, guided):
        te = self.pipe.text_encoder
        device = device if device is not None else _module_device(te)
        length = int(self.pipe.config.max_sequence_length)
        embeds = _example_tensor((batch_size, length, int(te.config.hidden_size)), _module_dtype(te), device, dtype)
        mask = _example_tensor((batch_size, length), torch.long, device)
        return OneStepConditioning(
            prompt_embeds=embeds, prompt_attention_mask=mask,
            negative_prompt_embeds=torch.randn_like(embeds) if guided else None,
            negative_prompt_attention_mask=torch.ones_like(mask) if guided else None,
        )

    def denoise(self, denoiser, x, t, cond, use_negative, guidance_scale, dtype):
        embeds, mask = self.text_inputs(cond, use_negative, x.device, dtype,
                                        names=("prompt_embeds", "prompt_attention_mask"))
        timestep = t * self.pipe.transformer.config.timestep_scale
        return denoiser(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timestep,
                        return_dict=False)[0]

    def stock_scheduler(self):
        # SanaPipeline takes any flow-matching scheduler: FlowMatchEulerDiscreteScheduler with the teacher's shift
        # takes one Euler step x - sigma * v at the sigma used here (its DPM-Solver's one-step sigma is another one)
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = self.pipe.scheduler
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            return scheduler, {}
        overrides = {"shift": float(scheduler.config.get("flow_shift", 1.0))}
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, **overrides), overrides

    def stock_call_kwargs(self, kwargs, guidance_scale):
        kwargs = super().stock_call_kwargs(kwargs, guidance_scale)
        kwargs["use_resolution_binning"] = False  # the generated size as it is
        instruction = self.pipe.config.complex_human_instruction
        if list(instruction or []) != list(self.stock_call_default("complex_human_instruction")):
            kwargs["complex_human_instruction"] = list(instruction or [])
        return kwargs


# ------------------------------------------------------------------ 2025-2026 families: Qwen-Image, Z-Image
def _pad_prompts(embeds, mask, length: int):
    """Prompt embeddings as (B, length, D) with their (B, length) int64 mask: right-padded with zeros.

    ``embeds``: a (B, L, D) tensor with its (B, L) mask (None: every token valid), or a list of (L_i, D) tensors
    (the valid tokens of each prompt; ``mask`` None). One width for every batch, so that conditionings of
    different batches concatenate; padding is masked out of the denoiser's attention.
    """
    if isinstance(embeds, (list, tuple)):
        rows = list(embeds)
    else:
        lengths = [embeds.shape[1]] * embeds.shape[0] if mask is None else mask.sum(dim=1).tolist()
        rows = [e[: int(n)] for e, n in zip(embeds, lengths)]
    out = rows[0].new_zeros((len(rows), length, rows[0].shape[-1]))
    valid = torch.zeros((len(rows), length), dtype=torch.long, device=rows[0].device)
    for i, row in enumerate(rows):
        if row.shape[0] > length:
            raise ValueError(f"a prompt encodes to {row.shape[0]} tokens, more than max_sequence_length={length}.")
        out[i, : row.shape[0]] = row
        valid[i, : row.shape[0]] = 1
    return out, valid


def _valid_lengths(mask: torch.Tensor) -> list[int]:
    """Valid tokens per row of a right-padded mask; shape-only tensors (memory planning: meta or fake, no values)
    count every position, the longest prompt."""
    try:
        return [int(n) for n in mask.sum(dim=1).tolist()]
    except RuntimeError:  # meta: NotImplementedError; fake: DataDependentOutputException (both RuntimeErrors)
        return [int(mask.shape[1])] * int(mask.shape[0])


class _PaddedPromptAdapter(_TextFamilyAdapter):
    """Text families whose stock ``encode_prompt`` gives prompts of their own lengths: the conditioning holds them
    right-padded to ``max_sequence_length`` with an attention mask (``prompt_attention_mask``)."""

    text_components = ("text_encoder", "tokenizer")
    flow_matching_only = True
    default_max_sequence_length = 512  # the stock pipelines' __call__ default
    required_components = ((("text_encoder", "tokenizer"), None),)
    # pipelines built on this family's denoiser that the one step does not take (edit, img2img, inpaint, ...)
    refused_pipeline_words: tuple = ("Edit", "Img2Img", "Inpaint", "ControlNet", "Layered", "Omni")
    packs_latents = True  # the denoiser takes 2x2 latent patches packed into tokens (in_channels = 4 x latent)

    @classmethod
    def check_model_index(cls, config, source):
        name = str(config.get("_class_name", ""))
        if name != cls.stock_pipeline_class.__name__ and any(w.lower() in name.lower()
                                                             for w in cls.refused_pipeline_words):
            raise ValueError(
                f"{source} is a {name}; one-step FD distillation takes text-to-image teachers of this family: "
                f"{cls.stock_pipeline_class.__name__}. Load the base text-to-image model."
            )

    @classmethod
    def default_sample_size(cls, denoiser):
        return 128  # 1024 px at the stock pipelines' VAE factor 8

    def noise_channels(self):
        channels = int(self.denoiser.config.in_channels)
        return channels // 4 if self.packs_latents else channels

    def image_seq_len(self):
        return (int(self.pipe.config.sample_size) // 2) ** 2

    def text_width(self) -> int:
        cfg = self.pipe.text_encoder.config
        return int(getattr(cfg, "text_config", cfg).hidden_size)

    def example_conditioning(self, batch_size, device, dtype, guided):
        te = self.pipe.text_encoder
        device = device if device is not None else _module_device(te)
        length = int(self.pipe.config.max_sequence_length)
        embeds = _example_tensor((batch_size, length, self.text_width()), _module_dtype(te), device, dtype)
        mask = _example_tensor((batch_size, length), torch.long, device)
        return OneStepConditioning(
            prompt_embeds=embeds, prompt_attention_mask=mask,
            negative_prompt_embeds=torch.randn_like(embeds) if guided else None,
            negative_prompt_attention_mask=torch.ones_like(mask) if guided else None,
        )

    def build_stock_text_pipeline(self, parts):
        return self.stock_pipeline_class(**parts, vae=None, transformer=None, scheduler=None)

    def masked_text_inputs(self, cond, use_negative, device, dtype):
        return self.text_inputs(cond, use_negative, device, dtype, names=("prompt_embeds", "prompt_attention_mask"))


class QwenImageAdapter(_PaddedPromptAdapter):
    """Qwen-Image: ``QwenImageTransformer2DModel`` (MMDiT) on packed 2x2 latent patches, a Qwen2.5-VL text encoder
    (QwenImagePipeline's prompt template, its first 34 tokens dropped), ``AutoencoderKLQwenImage`` with per-channel
    ``latents_mean`` / ``latents_std``, flow matching with a resolution-dependent shift, true classifier-free
    guidance against a negative prompt with QwenImagePipeline's rescale to the conditional prediction's norm."""

    name = "qwenimage"
    denoiser_class = QwenImageTransformer2DModel
    lora_loader = "QwenImageLoraLoaderMixin"
    stock_pipeline_class = QwenImagePipeline

    @classmethod
    def check_components(cls, denoiser, components):
        super().check_components(denoiser, components)
        cfg = denoiser.config
        if cfg.get("zero_cond_t", False) or cfg.get("use_layer3d_rope", False):
            raise ValueError(
                "this QwenImageTransformer2DModel is an edit / layered model (zero_cond_t or use_layer3d_rope), which "
                "takes reference images; one-step text-to-image supports the QwenImagePipeline base model "
                "(e.g. Qwen/Qwen-Image)."
            )

    def vae_scale_factor(self):
        return 2 ** len(self.pipe.vae.config.temperal_downsample)

    def image_channels(self):
        return int(self.pipe.vae.config.input_channels)

    def uses_negative_branch(self, guidance_scale):
        return guidance_scale > 1.0 and not self.pipe.transformer.config.guidance_embeds

    def encode_prompts(self, prompts, negative_prompts, guided, num_images_per_prompt, device):
        # one row per prompt, repeated here: QwenImagePipeline.encode_prompt repeats a 2-D mask into 3-D for n > 1
        stock = self.stock_text_pipeline()
        length = int(self.pipe.config.max_sequence_length)

        def encode(texts):
            embeds, mask = stock.encode_prompt(texts, device=device, num_images_per_prompt=1,
                                               max_sequence_length=length)
            return _pad_prompts(embeds, mask, length)

        embeds, mask = encode(prompts)
        cond = OneStepConditioning(prompt_embeds=embeds, prompt_attention_mask=mask)
        if guided:
            negative, negative_mask = encode(negative_prompts)
            cond = replace(cond, negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask)
        return cond.repeat_interleave(num_images_per_prompt)

    def flow_timestep_dtype(self, dtype):
        return dtype  # QwenImagePipeline passes it in the latents' dtype

    def denoise(self, denoiser, x, t, cond, use_negative, guidance_scale, dtype):
        embeds, mask = self.masked_text_inputs(cond, use_negative, x.device, dtype)
        n, c, h, w = x.shape
        vsf = self.pipe.vae_scale_factor
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full((n,), guidance_scale, device=x.device, dtype=torch.float32)
        out = denoiser(
            hidden_states=QwenImagePipeline._pack_latents(x, n, c, h, w),
            timestep=t / self.pipe.scheduler.config.num_train_timesteps, guidance=guidance,
            encoder_hidden_states=embeds, encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w // 2)]] * n,
            return_dict=False,
        )[0]
        return QwenImagePipeline._unpack_latents(out, h * vsf, w * vsf, vsf)[:, :, 0]

    def combine_guidance(self, cond_out, uncond_out, guidance_scale):
        # QwenImagePipeline rescales each latent token (a 2x2 patch of every channel) to the conditional one's norm
        combined = super().combine_guidance(cond_out, uncond_out, guidance_scale)
        n, c, h, w = combined.shape

        def tokens(v):
            return v.reshape(n, c, h // 2, 2, w // 2, 2)

        scale = torch.linalg.vector_norm(tokens(cond_out), dim=(1, 3, 5), keepdim=True) / torch.linalg.vector_norm(
            tokens(combined), dim=(1, 3, 5), keepdim=True)
        return (tokens(combined) * scale).reshape(n, c, h, w)

    def decode(self, latents):
        vae = self.pipe.vae
        cfg = vae.config
        shape = (1, int(cfg.z_dim), 1, 1, 1)
        latents = latents.unsqueeze(2).to(vae.dtype)  # one frame
        mean = torch.tensor(cfg.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(shape).to(latents.device, latents.dtype)
        return vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0].float()

    def stock_scheduler(self):
        # a shift_terminal stretches a multi-step schedule to end there; with one step it would move the only sigma
        # to shift_terminal (NaN at sigma 1). The one step here is the time-shifted sigma, as Lightning configs have
        scheduler = self.pipe.scheduler
        if not scheduler.config.get("shift_terminal", None):
            return scheduler, {}
        overrides = {"shift_terminal": None}
        return type(scheduler).from_config(scheduler.config, **overrides), overrides

    def stock_call_kwargs(self, kwargs, guidance_scale):
        kwargs = super().stock_call_kwargs(kwargs, guidance_scale)
        del kwargs["guidance_scale"]
        if self.pipe.transformer.config.guidance_embeds:
            kwargs["guidance_scale"] = guidance_scale
        if self.uses_negative_branch(guidance_scale):
            kwargs.update(true_cfg_scale=guidance_scale, negative_prompt="")
        else:
            kwargs["true_cfg_scale"] = 1.0  # the stock default (4.0) needs a negative prompt to take effect
        return kwargs


class ZImageAdapter(_PaddedPromptAdapter):
    """Z-Image (and the distilled Z-Image-Turbo): ``ZImageTransformer2DModel``, a single-stream DiT taking each
    prompt's valid Qwen3 tokens (``hidden_states[-2]`` of ZImagePipeline's chat template) and each latent as lists,
    its time input ``1 - sigma`` and its output the negated velocity; ``AutoencoderKL`` with scaling and shift
    factors, flow matching (static or resolution-dependent shift), classifier-free guidance ``pos + g (pos - neg)``
    (ZImagePipeline's ``guidance_scale`` is this pipeline's minus one)."""

    name = "zimage"

    def prompt_token_counts(self, prompts):
        return _chat_template_token_counts(self.pipe.tokenizer, prompts, enable_thinking=True)  # ZImagePipeline's
    denoiser_class = ZImageTransformer2DModel
    lora_loader = "ZImageLoraLoaderMixin"
    stock_pipeline_class = ZImagePipeline
    packs_latents = False  # the transformer patchifies each latent itself

    def encode_prompts(self, prompts, negative_prompts, guided, num_images_per_prompt, device):
        # lists copied: ZImagePipeline's encode_prompt writes the chat-templated prompts into the list it is given
        length = int(self.pipe.config.max_sequence_length)
        embeds, negative = self.stock_text_pipeline().encode_prompt(
            list(prompts), device=device, do_classifier_free_guidance=guided,
            negative_prompt=list(negative_prompts) if negative_prompts is not None else None,
            max_sequence_length=length,
        )
        embeds, mask = _pad_prompts(embeds, None, length)
        cond = OneStepConditioning(prompt_embeds=embeds, prompt_attention_mask=mask)
        if guided:
            negative, negative_mask = _pad_prompts(negative, None, length)
            cond = replace(cond, negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask)
        return cond.repeat_interleave(num_images_per_prompt)

    def denoise(self, denoiser, x, t, cond, use_negative, guidance_scale, dtype):
        embeds, mask = self.masked_text_inputs(cond, use_negative, x.device, dtype)
        captions = [e[:n] for e, n in zip(embeds, _valid_lengths(mask))]
        n_train = self.pipe.scheduler.config.num_train_timesteps
        out = denoiser(list(x.unsqueeze(2).unbind(0)), (n_train - t) / n_train, captions, return_dict=False)[0]
        # ZImagePipeline steps with the negated output: the velocity noise - x0
        return -torch.stack(out, dim=0)[:, :, 0]

    def stock_call_kwargs(self, kwargs, guidance_scale):
        kwargs = super().stock_call_kwargs(kwargs, guidance_scale)
        # ZImagePipeline: pos + g (pos - neg), on for g > 0; here uncond + g (cond - uncond), on for g > 1
        kwargs["guidance_scale"] = guidance_scale - 1.0
        return kwargs


class Flux2Adapter(_TextFamilyAdapter):
    """FLUX.2 [dev]: ``Flux2Transformer2DModel`` with a guidance embedding, a Mistral3 text encoder whose hidden states
    are stacked (``Flux2Pipeline.encode_prompt``: its system-message chat template, ``max_sequence_length``, layers
    10, 20, 30), ``AutoencoderKLFlux2`` whose batch-norm statistics normalize the 2x2-patchified latents, and flow
    matching with the pipeline's own resolution-dependent shift (``compute_empirical_mu``).

    The generator input is the stock pipeline's ``latents``: patchified, normalized latents (B, 4 x VAE latent
    channels, H / 16, W / 16), packed to tokens with their (T, H, W, L) position ids for the transformer.
    """

    name = "flux2"
    denoiser_class = Flux2Transformer2DModel
    lora_loader = "Flux2LoraLoaderMixin"
    stock_pipeline_class = Flux2Pipeline
    text_components = ("text_encoder", "tokenizer")
    flow_matching_only = True
    required_components = ((("text_encoder", "tokenizer"), None),)
    # the single-stream blocks (most of the model) attend through one fused projection
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj")
    guidance_embedded = True  # guidance-distilled: the scale is an embedding, one forward; else true CFG against ""

    @classmethod
    def describe(cls):
        return f"{cls.name} ({cls.denoiser_class.__name__} under {cls.stock_pipeline_class.__name__})"

    @classmethod
    def owns_denoiser(cls, denoiser):
        return isinstance(denoiser, cls.denoiser_class) and bool(denoiser.config.guidance_embeds) == cls.guidance_embedded

    @classmethod
    def owns_model_index(cls, config):
        # both FLUX.2 pipelines hold a Flux2Transformer2DModel; the klein ones are named so
        klein = str(config.get("_class_name", "")).startswith("Flux2Klein")
        return FamilyAdapter.owns_model_index.__func__(cls, config) and klein == (cls.guidance_embedded is False)

    @classmethod
    def check_model_index(cls, config, source):
        name = str(config.get("_class_name", ""))
        base = cls.stock_pipeline_class.__name__
        if name != base:
            raise ValueError(
                f"{source} is a {name}; one-step FD distillation supports the FLUX.2 text-to-image pipeline {base} "
                f"(its image-editing, inpainting and ControlNet variants condition on images the one step does not "
                f"take): load the base model's {base} folder."
            )

    @classmethod
    def stock_call_default(cls, name):
        return inspect.signature(cls.stock_pipeline_class.__call__).parameters[name].default

    @classmethod
    def text_encoder_out_layers(cls) -> tuple:
        """The text encoder hidden states the stock pipeline stacks (its ``text_encoder_out_layers`` default)."""
        return tuple(cls.stock_call_default("text_encoder_out_layers"))

    @classmethod
    def check_components(cls, denoiser, components):
        super().check_components(denoiser, components)
        te = components["text_encoder"]
        text_config = getattr(te.config, "text_config", te.config)
        layers, stacked = int(text_config.num_hidden_layers), cls.text_encoder_out_layers()
        if layers < max(stacked):
            raise ValueError(
                f"{cls.stock_pipeline_class.__name__} stacks the text encoder's hidden states {stacked}, but this "
                f"{type(te).__name__} has {layers} layers: use a text encoder with at least {max(stacked)} layers "
                "(the one the teacher was trained with)."
            )
        width = len(stacked) * int(text_config.hidden_size)
        if width != int(denoiser.config.joint_attention_dim):
            raise ValueError(
                f"this {type(te).__name__} gives {len(stacked)} stacked hidden states x {text_config.hidden_size} = "
                f"{width} values per token, but the transformer takes joint_attention_dim="
                f"{denoiser.config.joint_attention_dim}: pass the text encoder the teacher was trained with."
            )

    @classmethod
    def resolve_settings(cls, denoiser, scheduler, settings):
        if settings["max_sequence_length"] is None:
            settings["max_sequence_length"] = int(cls.stock_call_default("max_sequence_length"))
        return super().resolve_settings(denoiser, scheduler, settings)

    @classmethod
    def default_sample_size(cls, denoiser):
        return 64  # the stock default image, 128 VAE latents (1024 px), in 2x2 patches

    def vae_scale_factor(self):
        return 2 * super().vae_scale_factor()  # image pixels per patchified latent, as the stock image processor's

    def image_seq_len(self):
        return int(self.pipe.config.sample_size) ** 2

    def flow_shift_mu(self):
        # Flux2Pipeline's mu of one step at this image size, not the scheduler's base/max shift interpolation
        return compute_empirical_mu(image_seq_len=self.image_seq_len(), num_steps=1)

    def prompt_token_counts(self, prompts):
        # Flux2Pipeline: its system message and the Mistral chat template around each prompt (the rendered text
        # holds its special tokens, as the processor's own tokenizing of it)
        processor = self.pipe.tokenizer
        texts = processor.apply_chat_template(format_input(prompts=list(prompts), system_message=FLUX2_SYSTEM_MESSAGE),
                                              add_generation_prompt=False, tokenize=False)
        ids = processor.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return [len(i) for i in ids]

    def uses_negative_branch(self, guidance_scale):
        return guidance_scale > 1.0 and not self.guidance_embedded

    def build_stock_text_pipeline(self, parts):
        return self.stock_pipeline_class(**parts, vae=None, transformer=None, scheduler=None)

    def encode_prompts(self, prompts, negative_prompts, guided, num_images_per_prompt, device):
        # encode_prompt has no negative branch; Flux2KleinPipeline encodes its negative prompt with a second call
        stock = self.stock_text_pipeline()
        length = int(self.pipe.config.max_sequence_length)
        embeds, _ = stock.encode_prompt(prompts, device=device, num_images_per_prompt=num_images_per_prompt,
                                        max_sequence_length=length)
        cond = OneStepConditioning(prompt_embeds=embeds)
        if guided:
            negative, _ = stock.encode_prompt(negative_prompts, device=device,
                                              num_images_per_prompt=num_images_per_prompt, max_sequence_length=length)
            cond = replace(cond, negative_prompt_embeds=negative)
        return cond

    def example_conditioning(self, batch_size, device, dtype, guided):
        te = self.pipe.text_encoder
        device = device if device is not None else _module_device(te)
        width = len(self.text_encoder_out_layers()) * int(getattr(te.config, "text_config", te.config).hidden_size)
        shape = (batch_size, int(self.pipe.config.max_sequence_length), width)
        embeds = _example_tensor(shape, _module_dtype(te), device, dtype)
        return OneStepConditioning(prompt_embeds=embeds,
                                   negative_prompt_embeds=torch.randn_like(embeds) if guided else None)

    def flow_timestep_dtype(self, dtype):
        return dtype  # the stock pipeline passes it in the latents' dtype

    def denoise(self, denoiser, x, t, cond, use_negative, guidance_scale, dtype):
        (embeds,) = self.text_inputs(cond, use_negative, x.device, dtype, names=("prompt_embeds",))
        n, c, h, w = x.shape
        stock = self.stock_pipeline_class
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full((n,), guidance_scale, device=x.device, dtype=torch.float32)
        out = denoiser(
            hidden_states=stock._pack_latents(x), timestep=t / 1000, guidance=guidance, encoder_hidden_states=embeds,
            txt_ids=stock._prepare_text_ids(embeds).to(x.device), img_ids=stock._prepare_latent_ids(x).to(x.device),
            return_dict=False,
        )[0]
        # the inverse of _pack_latents: the stock's _unpack_latents_with_ids scatters the tokens by the same row-major
        # position ids (a reshape also runs on fake tensors)
        return out.permute(0, 2, 1).reshape(n, c, h, w)

    def decode(self, latents):
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                                latents.dtype)
        latents = self.stock_pipeline_class._unpatchify_latents(latents * std + mean)
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()


class Flux2KleinAdapter(Flux2Adapter):
    """FLUX.2 [klein] (4B / 9B): the FLUX.2 transformer without a guidance embedding (true classifier-free guidance
    against the empty prompt, as ``Flux2KleinPipeline``) and a Qwen3 text encoder (its chat template without thinking,
    hidden states 9, 18, 27)."""

    name = "flux2_klein"
    stock_pipeline_class = Flux2KleinPipeline
    guidance_embedded = False

    @classmethod
    def resolve_settings(cls, denoiser, scheduler, settings):
        distilled = bool(settings.get("is_distilled"))
        settings = super().resolve_settings(denoiser, scheduler, settings)
        settings["is_distilled"] = distilled
        return settings

    def prompt_token_counts(self, prompts):
        return _chat_template_token_counts(self.pipe.tokenizer, prompts, enable_thinking=False)  # Flux2KleinPipeline's

    def uses_negative_branch(self, guidance_scale):
        # a step-distilled klein takes no guidance: Flux2KleinPipeline ignores guidance_scale (with a warning)
        return super().uses_negative_branch(guidance_scale) and not self.pipe.config.is_distilled


def _chat_template_token_counts(tokenizer, prompts, **template_kwargs) -> list[int]:
    """Tokens of each prompt inside a Qwen3 chat template (a user turn and the generation prompt), untruncated."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                           **template_kwargs) for p in prompts]
    return [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]


FAMILY_ADAPTERS = {cls.name: cls for cls in (UNet2DAdapter, DiTAdapter, SDAdapter, SDXLAdapter, SD3Adapter,
                                             FluxAdapter, SanaAdapter,
                                             QwenImageAdapter, ZImageAdapter,
                                             Flux2Adapter, Flux2KleinAdapter)}
# family -> (denoiser component, denoiser class, latent?, conditioning, LoRA route)
SUPPORTED_FAMILIES = {
    name: (cls.denoiser_slot, cls.denoiser_class, cls.is_latent, cls.conditioning, cls.lora_loader or "peft")
    for name, cls in FAMILY_ADAPTERS.items()
}
# default LoRA targets per family (module-name suffixes, PEFT ``target_modules``)
DEFAULT_LORA_TARGETS = {name: list(cls.default_lora_targets) for name, cls in FAMILY_ADAPTERS.items()}


def supported_families_text() -> str:
    """The registered families with their denoiser classes, for help texts and errors."""
    return ", ".join(cls.describe() for cls in FAMILY_ADAPTERS.values())


_supported_text = supported_families_text


def adapter_of_denoiser(denoiser: torch.nn.Module) -> type[FamilyAdapter]:
    """The family adapter class of a denoiser instance (ValueError naming the supported families otherwise)."""
    for cls in FAMILY_ADAPTERS.values():
        if type(denoiser) is cls.denoiser_class and cls.owns_denoiser(denoiser):
            return cls
    for cls in FAMILY_ADAPTERS.values():
        if cls.owns_denoiser(denoiser):
            return cls
    if isinstance(denoiser, UNet2DConditionModel):
        raise ValueError(
            f"UNet2DConditionModel with addition_embed_type={denoiser.config.addition_embed_type!r} is not supported "
            f"(sd: none, sdxl: 'text_time'); supported families: {_supported_text()}."
        )
    raise ValueError(
        f"unsupported denoiser class {type(denoiser).__name__}; supported families: {_supported_text()}."
    )


def family_of_denoiser(denoiser: torch.nn.Module) -> str:
    """Family name of a denoiser instance (ValueError listing the supported classes otherwise)."""
    return adapter_of_denoiser(denoiser).name


# --------------------------------------------------------------------------------------------------
# Finding a teacher
# --------------------------------------------------------------------------------------------------
PIPELINE_FOLDER_LAYOUT = (
    "from_teacher needs a diffusers pipeline folder, as DiffusionPipeline.save_pretrained writes it: model_index.json, "
    "scheduler/ and unet/ or transformer/ (plus vae/ and the text encoders of latent and text models)"
)


def _looks_like_local_path(name: str) -> bool:
    """A string that cannot be a Hub id (``name`` or ``org/name``): absolute, ``./``-style or deeper paths."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def _not_a_pipeline_message(folder: str) -> str:
    """What is wrong with a local folder that has no model_index.json, and how to fix it."""
    message = f"{folder} is not a diffusers pipeline folder: it has no model_index.json"
    config_file = os.path.join(folder, "config.json")
    model_class = None
    if os.path.isfile(config_file):
        try:
            with open(config_file) as f:
                model_class = json.load(f).get("_class_name")
        except (OSError, ValueError):
            model_class = None
    if model_class:
        message += f" (its config.json is that of one model, a {model_class}, not of a pipeline)"
    message += f". {PIPELINE_FOLDER_LAYOUT}."
    parent = os.path.dirname(os.path.abspath(folder))
    if os.path.isfile(os.path.join(parent, "model_index.json")):
        message += f" This folder is a component of the pipeline in {parent}: pass that folder instead."
    elif model_class:
        message += (
            f" To use a bare {model_class}, save a pipeline around it with the scheduler it was trained with, e.g. "
            f"DDPMPipeline(unet={model_class}.from_pretrained(folder), scheduler=DDPMScheduler(...))"
            ".save_pretrained(out), and pass `out`."
        )
    return message


def _exception_chain_names(err: BaseException) -> set[str]:
    names, seen = set(), set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        names.update(cls.__name__ for cls in type(err).__mro__)
        err = err.__cause__ or err.__context__
    return names


def _check_component_folders(name_or_path, needed, passed=()) -> None:
    """A local pipeline folder has a subfolder for every ``needed`` component its ``model_index.json`` lists
    (except those ``passed`` as objects): else a ``FileNotFoundError`` naming the missing component, not the
    folder's root (diffusers' own message)."""
    name = os.fspath(name_or_path)
    index_file = os.path.join(name, "model_index.json")
    if not os.path.isfile(index_file):
        return
    with open(index_file) as f:
        index = json.load(f)
    for component, entry in index.items():
        if component not in needed or component in passed or not isinstance(entry, (list, tuple)):
            continue
        if len(entry) == 2 and entry[1] is not None and not os.path.isdir(os.path.join(name, component)):
            raise FileNotFoundError(
                f"{name}: model_index.json lists the component {component!r} ({entry[1]}) but there is no "
                f"{os.path.join(name, component)} folder. Copy the complete pipeline folder (with {component}/), "
                f"or pass the component itself: from_pretrained(..., {component}=...)."
            )


def _teacher_model_index(name_or_path, load_kwargs: dict) -> dict:
    """``model_index.json`` of a teacher (local folder or Hub id), or an error that names the problem and the fix.

    ``load_kwargs``: ``cache_dir`` / ``revision`` / ``token`` / ``local_files_only`` for
    ``DiffusionPipeline.load_config``.
    """
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "model_index.json")):
            raise FileNotFoundError(_not_a_pipeline_message(name))
        return DiffusionPipeline.load_config(name, **load_kwargs)
    if os.path.exists(name):
        raise FileNotFoundError(f"{name} is a file; {PIPELINE_FOLDER_LAYOUT}, or a Hub id of such a pipeline.")
    if _looks_like_local_path(name):
        raise FileNotFoundError(f"no such folder: {name}. Pass an existing local pipeline folder or a Hub id "
                                f"(org/name); {PIPELINE_FOLDER_LAYOUT}.")
    try:
        return DiffusionPipeline.load_config(name, **load_kwargs)
    except OSError as err:
        # huggingface_hub's errors under diffusers' OSError: OfflineModeIsEnabled (HF_HUB_OFFLINE=1) and
        # LocalEntryNotFoundError (not in the cache, and the Hub not asked or not reachable)
        chain = _exception_chain_names(err)
        download = f"`hf download {name}" + (f" --revision {load_kwargs['revision']}`" if load_kwargs.get("revision")
                                              else "`")
        if {"OfflineModeIsEnabled", "LocalEntryNotFoundError"} & chain:
            if "OfflineModeIsEnabled" in chain:
                why = "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)"
            elif load_kwargs.get("local_files_only"):
                why = "local_files_only=True keeps the Hugging Face Hub out"
            else:
                why = "the Hugging Face Hub could not be reached"
            raise OSError(
                f"{name!r} is not a local folder, {why} and no copy of {name!r} is in the local cache. Download it "
                f"first, while online: {download} (this call then finds it in the cache), or `hf download {name} "
                "--local-dir DIR` and pass DIR (a local pipeline folder)."
            ) from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(
            f"could not load the teacher {name!r} from the Hugging Face Hub ({reason}). Check the id (a diffusers "
            f"pipeline repo with model_index.json), your connection and token, or download it first with {download} "
            "and pass the local folder."
        ) from None


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------
class FDOneStepPipeline(DiffusionPipeline):
    r"""One-step generator from a diffusers model: one denoiser forward (two with guidance) from pure noise.

    Components (registered the diffusers way; only what the family needs is set):
        scheduler: a DDPM-style scheduler with ``alphas_cumprod`` or a flow-matching one
            (``FlowMatchEulerDiscreteScheduler``, or ``DPMSolverMultistepScheduler`` with flow sigmas; only its noise
            schedule is used).
        unet (`UNet2DModel` | `UNet2DConditionModel`) or transformer (`DiTTransformer2DModel` |
            `SD3Transformer2DModel` | `FluxTransformer2DModel` | `SanaTransformer2DModel` |
            `QwenImageTransformer2DModel` | `ZImageTransformer2DModel` | `Flux2Transformer2DModel`): the denoiser.
        vae (`AutoencoderKL` | `AutoencoderDC` | `AutoencoderKLQwenImage` | `AutoencoderKLFlux2`): latent families.
        text_encoder / tokenizer, text_encoder_2 / tokenizer_2, text_encoder_3 / tokenizer_3: the text
        components of the family's stock pipeline, under the same names (SD: one CLIP; SDXL and SD3: two CLIPs,
        SD3 an optional T5 third; Flux: CLIP and T5; SANA: Gemma-2; Qwen-Image: Qwen2.5-VL; Z-Image: Qwen3;
        FLUX.2: Mistral3 and its processor; FLUX.2 klein: Qwen3).

    Everything that differs between families lives in one adapter class per family (``pipe.adapter``, see
    ``FAMILY_ADAPTERS``). One-step settings (all in the pipeline config, see the module docstring): ``family``,
    ``timestep``, ``prediction_type``, ``guidance_scale``, ``output_bound``, ``sample_size``,
    ``null_class_label``, ``max_sequence_length``, ``force_zeros_for_empty_prompt``, ``complex_human_instruction``,
    ``is_distilled``.
    """

    SUPPORTED_FAMILIES = SUPPORTED_FAMILIES
    FAMILY_ADAPTERS = FAMILY_ADAPTERS
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->vae"
    _optional_components = [
        "unet",
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
    ]

    def __init__(
        self,
        scheduler,
        unet=None,
        transformer=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        family: str | None = None,
        timestep: int | None = None,
        prediction_type: str | None = None,
        guidance_scale: float = 1.0,
        output_bound: str | None = None,
        sample_size: int | None = None,
        null_class_label: int | None = None,
        max_sequence_length: int | None = None,
        force_zeros_for_empty_prompt: bool | None = None,
        complex_human_instruction: list[str] | None = None,
        is_distilled: bool | None = None,
    ):
        super().__init__()
        denoiser = unet if unet is not None else transformer
        if denoiser is None:
            raise ValueError(
                "FDOneStepPipeline needs a denoiser: pass `unet` or `transformer`. Supported families: "
                f"{_supported_text()}."
            )
        adapter_cls = adapter_of_denoiser(denoiser)
        if family is not None and family != adapter_cls.name:
            raise ValueError(
                f"family={family!r} does not match the denoiser ({type(denoiser).__name__} is {adapter_cls.name!r})."
            )
        family = adapter_cls.name
        slot = adapter_cls.denoiser_slot
        if (slot == "unet" and unet is None) or (slot == "transformer" and transformer is None):
            raise ValueError(f"a {type(denoiser).__name__} must be passed as `{slot}`, not as the other slot.")
        components = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                          tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        adapter_cls.check_components(denoiser, components)

        flow = is_flow_matching_scheduler(scheduler)
        if adapter_cls.flow_matching_only and not flow:
            raise ValueError(f"the {family!r} family needs a flow-matching scheduler (FlowMatchEulerDiscreteScheduler).")
        if prediction_type is None:
            prediction_type = "flow" if flow else scheduler.config.get("prediction_type", "epsilon")
        allowed = FLOW_PREDICTION_TYPES if flow else DDPM_PREDICTION_TYPES
        if prediction_type not in allowed:
            raise ValueError(
                f"unsupported prediction_type {prediction_type!r} for {type(scheduler).__name__}; supported: "
                f"{', '.join(allowed)} (DDPM-style: {', '.join(DDPM_PREDICTION_TYPES)}; flow matching: flow)."
            )
        if output_bound not in OUTPUT_BOUNDS:
            raise ValueError(f"output_bound must be one of {OUTPUT_BOUNDS}, got {output_bound!r}.")
        if timestep is None:
            timestep = default_timestep(scheduler)
        timestep = int(timestep)
        guidance_scale = float(guidance_scale)
        settings = adapter_cls.resolve_settings(denoiser, scheduler, dict(
            sample_size=sample_size, null_class_label=null_class_label, max_sequence_length=max_sequence_length,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            complex_human_instruction=complex_human_instruction, is_distilled=is_distilled,
        ))

        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer, **components)
        self.register_to_config(
            family=family,
            timestep=timestep,
            prediction_type=prediction_type,
            guidance_scale=guidance_scale,
            output_bound=output_bound,
            sample_size=int(settings["sample_size"]),
            null_class_label=settings["null_class_label"],
            max_sequence_length=settings["max_sequence_length"],
            force_zeros_for_empty_prompt=settings["force_zeros_for_empty_prompt"],
            complex_human_instruction=settings["complex_human_instruction"],
            is_distilled=settings.get("is_distilled"),
        )
        self.adapter = adapter_cls(self)
        self.vae_scale_factor = self.adapter.vae_scale_factor()
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.amplification = check_one_step_conditioning(
            prediction_type, self.noise_level(), timestep, output_bound
        )

    # ------------------------------------------------------------------ description
    @property
    def family(self) -> str:
        return self.config.family

    @property
    def denoiser_slot(self) -> str:
        """The component that holds the denoiser: "unet" or "transformer"."""
        return self.adapter.denoiser_slot

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that the one step runs (``unet`` or ``transformer``)."""
        return getattr(self, self.adapter.denoiser_slot)

    @property
    def is_latent(self) -> bool:
        return self.adapter.is_latent

    @property
    def num_classes(self) -> int | None:
        return self.adapter.num_classes()

    @property
    def is_class_conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def is_text_conditional(self) -> bool:
        return self.adapter.conditioning == "text"

    @property
    def frozen_component_names(self) -> list[str]:
        """Components that stay frozen in training (VAE, text encoders)."""
        return self.adapter.frozen_component_names()

    @property
    def float32_component_names(self) -> list[str]:
        """Frozen components kept in float32 under mixed precision (an SDXL VAE with ``force_upcast``)."""
        return self.adapter.float32_component_names()

    def noise_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one generator input: pixels ("unet2d") or unpacked VAE latents."""
        s = self.config.sample_size
        return (self.adapter.noise_channels(), s, s)

    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one generated image."""
        c, h, w = self.noise_shape()
        if not self.is_latent:
            return (self.adapter.image_channels(), h, w)
        return (self.adapter.image_channels(), h * self.vae_scale_factor, w * self.vae_scale_factor)

    def noise_level(self) -> dict:
        """``{"kind": "ddpm", "alpha_prod": a}`` or ``{"kind": "flow", "sigma": s}`` of the configured timestep."""
        return noise_level(self.scheduler, self.config.timestep, image_seq_len=self.adapter.image_seq_len(),
                           mu=self.adapter.flow_shift_mu())

    # ------------------------------------------------------------------ conditioning
    def _stock_text_pipeline(self) -> DiffusionPipeline:
        """The stock diffusers pipeline of this family over this pipeline's own text components (shared, not copied);
        its ``encode_prompt`` encodes every prompt here."""
        return self.adapter.stock_text_pipeline()

    def _uses_negative_branch(self, guidance_scale: float) -> bool:
        return self.adapter.uses_negative_branch(guidance_scale)

    def encode_conditioning(
        self,
        prompt: str | list[str] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        device: torch.device | str | None = None,
    ) -> OneStepConditioning | None:
        """Build the conditioning for ``one_step`` (prompts encoded by the stock pipeline's ``encode_prompt``; not
        cached here).

        Returns ``None`` for unconditional models. Each prompt / label is repeated ``num_images_per_prompt``
        times (consecutive rows). With guidance (> 1) text families also get negative embeddings (of ``""`` by
        default; SDXL: as its stock pipeline, zeros when ``force_zeros_for_empty_prompt``).
        """
        device = torch.device(device) if device is not None else self._execution_device
        guidance_scale = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        if self.is_text_conditional:
            if class_labels is not None:
                raise ValueError(f"the {self.family!r} family is text-conditioned: pass `prompt`, not `class_labels`.")
            if prompt is None:
                raise ValueError(f"the {self.family!r} family is text-conditioned: pass `prompt` (str or list of str).")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            guided = self._uses_negative_branch(guidance_scale)
            negs = None
            if guided:
                neg = negative_prompt if negative_prompt is not None else self.adapter.default_negative_prompt()
                if neg is not None:
                    negs = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
                    if len(negs) != len(prompts):
                        raise ValueError(
                            f"got {len(negs)} negative prompts for {len(prompts)} prompts; pass one per prompt."
                        )
            return self.adapter.encode_prompts(prompts, negs, guided, num_images_per_prompt, device)
        if prompt is not None:
            raise ValueError(f"the {self.family!r} family takes no prompt; use class_labels (class-conditional) or batch_size.")
        if self.is_class_conditional:
            if class_labels is None:
                raise ValueError(
                    f"this {type(self.denoiser).__name__} is class-conditional ({self.num_classes} classes): pass "
                    "`class_labels` (int or list of ints)."
                )
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"class_labels must be in [0, {self.num_classes - 1}], got {labels.tolist()}.")
            return OneStepConditioning(class_labels=labels.to(device)).repeat_interleave(num_images_per_prompt)
        if class_labels is not None:
            raise ValueError("this model is unconditional: drop `class_labels` (use batch_size).")
        return None

    def example_conditioning(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        guidance_scale: float | None = None,
    ) -> OneStepConditioning | None:
        """Conditioning of ``batch_size`` rows with the exact shapes and dtypes ``encode_conditioning`` gives (random
        values; no text encoder runs), derived from the component configs and ``max_sequence_length``.

        For planning memory and compute: works with components on the ``meta`` device and under
        ``FakeTensorMode``. ``device``: default the text encoder's (the denoiser's for class labels); ``dtype``:
        overrides the float tensors' dtype (labels and attention masks stay int64). With guidance (> 1; default the
        config's) the negative rows of text families are included. ``None`` for unconditional models.
        """
        guidance_scale = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        guided = self.is_text_conditional and self._uses_negative_branch(guidance_scale)
        return self.adapter.example_conditioning(int(batch_size), device, dtype, guided)

    # ------------------------------------------------------------------ the one step
    def _forward_denoiser(self, denoiser, x, cond: OneStepConditioning | None, guidance_scale: float):
        """Raw model output (B, C, h, w) in the unpacked latent / pixel layout (learned-sigma half dropped)."""
        b = x.shape[0]
        level = self.noise_level()
        params = denoiser.parameters() if isinstance(denoiser, torch.nn.Module) else None
        dtype = next(params if params is not None else self.denoiser.parameters(), None)
        dtype = dtype.dtype if dtype is not None else next(self.denoiser.parameters()).dtype
        use_negative = self._uses_negative_branch(guidance_scale)
        if cond is not None and len(cond) != b:
            raise ValueError(f"conditioning has {len(cond)} rows but the noise has {b}; pass one row per sample.")

        xin = (torch.cat([x, x], dim=0) if use_negative else x).to(dtype)
        n = xin.shape[0]
        if level["kind"] == "ddpm":
            t = torch.full((n,), self.config.timestep, device=x.device, dtype=torch.long)
        else:
            t = torch.full((n,), level["sigma"] * self.scheduler.config.num_train_timesteps, device=x.device,
                           dtype=self.adapter.flow_timestep_dtype(dtype))
        out = self.adapter.denoise(denoiser, xin, t, cond, use_negative, guidance_scale, dtype)
        if out.shape[1] == 2 * x.shape[1]:
            # learned-sigma models (DiT, improved DDPM, SANA with learned sigma): the first half is the mean prediction
            out = out[:, : x.shape[1]]
        if use_negative:
            cond_out, uncond_out = out.chunk(2)
            out = self.adapter.combine_guidance(cond_out, uncond_out, guidance_scale)
        return out

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> images (B, C, H, W) float32, nominally in [-1, 1] (differentiable)."""
        return self.adapter.decode(latents)

    def one_step(
        self,
        latents: torch.Tensor,
        conditioning: OneStepConditioning | None = None,
        denoiser: torch.nn.Module | None = None,
        decode: bool = True,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Differentiable one-step map (no ``torch.no_grad``): noise -> clean sample.

        Args:
            latents: (B, *noise_shape()) pure noise (the generator input).
            conditioning: from ``encode_conditioning`` (None for unconditional models).
            denoiser: the network to run instead of ``self.denoiser`` (e.g. accelerate/DDP-wrapped or
                PEFT-wrapped copy being trained); must accept the same call signature.
            decode: True: images (B, C, H, W) float32 (VAE-decoded for latent families, ``output_bound``
                applied; in [-1, 1] when a bound is set). False: the clean sample in model space (latents
                as the denoiser sees them, or pixels), float32, no bound.
            guidance_scale: overrides the config's value.
        """
        denoiser = self.denoiser if denoiser is None else denoiser
        guidance_scale = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        expected = self.noise_shape()
        if latents.ndim != 4 or tuple(latents.shape[1:]) != expected:
            raise ValueError(f"latents must have shape (B, {', '.join(map(str, expected))}), got {tuple(latents.shape)}.")
        out = self._forward_denoiser(denoiser, latents, conditioning, guidance_scale)
        # float64 conversion: the epsilon route divides by sqrt(a), which would magnify float32 rounding
        x0 = prediction_to_sample(out.double(), latents.double(), self.config.prediction_type, self.noise_level())
        x0 = x0.float()
        if not decode:
            return x0
        images = self.decode_latents(x0) if self.is_latent else x0
        return apply_output_bound(images, self.config.output_bound)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        batch_size: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        num_inference_steps: int | None = None,
    ):
        r"""Generate images in one denoiser forward (two branches batched together with guidance).

        Args:
            prompt: text families ("sd", "sdxl", "sd3", "flux", "sana", "qwenimage", "zimage").
            class_labels: class-conditional families ("dit", class-conditional "unet2d").
            batch_size: number of images for unconditional models (default 1, or taken from ``latents``).
            num_images_per_prompt: images per prompt / label (or multiplier of ``batch_size``).
            generator: torch generator(s) for the noise (bit-identical results for the same seed).
            latents: (B, *noise_shape()) pre-drawn noise; overrides ``generator``.
            guidance_scale: overrides the config's guidance scale.
            negative_prompt: text families with guidance ("" by default).
            output_type: "pil" | "np" (B, H, W, C) in [0, 1] | "pt" (B, C, H, W) in [0, 1] | "latent" (the
                clean sample in model space: latents, or pixels in [-1, 1] for "unet2d").
            return_dict: return ``ImagePipelineOutput`` (else a tuple).
            num_inference_steps: accepted for diffusers-style calls: 1 or None (the pipeline always takes one
                step); any other value raises a ValueError.
        """
        if num_inference_steps is not None and num_inference_steps != 1:
            raise ValueError(
                f"a one-step pipeline: num_inference_steps must be 1 (or left out), got {num_inference_steps!r}. "
                "For multi-step sampling use the teacher's own pipeline."
            )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        device = self._execution_device
        guidance_scale = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        if not self.is_text_conditional and not self.is_class_conditional and prompt is None and class_labels is None:
            if batch_size is None:
                batch_size = latents.shape[0] // num_images_per_prompt if latents is not None else 1
            cond = None
            n = batch_size * num_images_per_prompt
        else:
            if batch_size is not None:
                raise ValueError("batch_size is for unconditional models; pass one prompt / class label per image.")
            cond = self.encode_conditioning(
                prompt=prompt, class_labels=class_labels, negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt, guidance_scale=guidance_scale, device=device,
            )
            n = len(cond)
        shape = (n, *self.noise_shape())
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this call, got {tuple(latents.shape)}.")
        latents = latents.to(device)

        if output_type == "latent":
            image = self.one_step(latents, cond, decode=False, guidance_scale=guidance_scale)
        else:
            image = self.one_step(latents, cond, decode=True, guidance_scale=guidance_scale)
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    # ------------------------------------------------------------------ the stock pipelines' one step
    def stock_one_step(self) -> dict:
        """How the teacher's stock diffusers pipeline takes exactly this one step (the LCM-LoRA / TCD recipe).

        Returns ``{"pipeline": <stock class name>, "scheduler": <scheduler>, "scheduler_overrides": {...},
        "call_kwargs": {...}}`` (the scheduler is ``type(scheduler).from_config(teacher's config,
        **scheduler_overrides)``; no overrides: the teacher's own): set ``stock_pipe.scheduler`` to the
        scheduler (after loading the LoRA, if any) and call ``stock_pipe(prompt, **call_kwargs)`` with the same
        noise as ``latents=`` to get this pipeline's images (to float32 round-off). The stock pipelines:
        ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``,
        ``SanaPipeline``, ``QwenImagePipeline``, ``ZImagePipeline``, ``DDPMPipeline`` (the family adapter's
        ``stock_pipeline``).

        - DDPM-style teachers: ``DDIMScheduler`` from the teacher's config with ``timestep_spacing="leading"``,
          ``steps_offset = timestep`` (its one timestep is then this pipeline's), ``set_alpha_to_one=True``,
          ``clip_sample=False`` and ``thresholding=False``, so that with ``eta = 0`` the step to "t = -1" returns
          the clean-sample estimate itself; ``num_inference_steps=1``.
        - Flow matching: the teacher's ``FlowMatchEulerDiscreteScheduler`` (SANA: one built from its DPM-Solver's
          config with ``shift=flow_shift``; Qwen-Image: its own without ``shift_terminal``, which with one step would
          move the only sigma to ``shift_terminal``, NaN at sigma 1): one Euler step from sigma to 0 is ``x - sigma * v``;
          ``sigmas=[timestep / N]`` (shifted by the scheduler, as here) when the timestep is not the top one.
        - Prompts: SD3, Flux and SANA with this pipeline's ``max_sequence_length``; SANA without resolution binning
          and with this pipeline's complex human instruction where it is not the stock default.
        - Guidance: ``guidance_scale`` (SD, SD3: the stock pipelines' classifier-free guidance against the empty
          negative prompt, as here; guidance-distilled Flux: its guidance embedding); Flux without a guidance
          embedding and Qwen-Image: ``true_cfg_scale`` with ``negative_prompt=""`` (``true_cfg_scale=1`` without
          guidance); Z-Image: ``guidance_scale=g - 1`` (ZImagePipeline's ``pos + s (pos - neg)``).

        Raises ValueError for what the stock pipelines cannot reproduce: ``output_bound="tanh"`` (they clamp,
        which is ``"clamp"`` or no bound), class-conditional models (no stock pipeline samples a class-conditional
        UNet2DModel; DiTPipeline decodes its own way).
        """
        from diffusers import DDIMScheduler

        if self.config.output_bound == "tanh":
            raise ValueError(
                "output_bound='tanh' has no stock equivalent: the stock pipelines clamp the decoded image to [-1, 1] "
                "(output_bound 'clamp' or None give the same images); train with --output_bound clamp to ship a "
                "LoRA for the stock pipeline."
            )
        if self.is_class_conditional:
            raise ValueError(f"no stock diffusers pipeline takes the one step of a class-conditional {self.family!r} "
                             "model the same way; use FDOneStepPipeline.")
        g = float(self.config.guidance_scale)
        stock = self.adapter.stock_pipeline
        if stock is None:
            raise ValueError(f"no stock diffusers pipeline is known to take the one step of the {self.family!r} family.")
        kwargs = {"num_inference_steps": 1}
        if self.is_latent:  # the image size this pipeline generates (the stock default may differ)
            kwargs["height"] = kwargs["width"] = int(self.config.sample_size) * self.vae_scale_factor
        level = self.noise_level()
        if level["kind"] == "flow":
            scheduler, overrides = self.adapter.stock_scheduler()
            n = int(self.scheduler.config.num_train_timesteps)
            if self.config.timestep != n:
                kwargs["sigmas"] = [self.config.timestep / n]
        else:
            overrides = {"timestep_spacing": "leading", "steps_offset": int(self.config.timestep),
                         "set_alpha_to_one": True, "clip_sample": False, "thresholding": False,
                         "prediction_type": self.config.prediction_type}
            scheduler = DDIMScheduler.from_config(self.scheduler.config, **overrides)
        kwargs = self.adapter.stock_call_kwargs(kwargs, g)
        return {"pipeline": stock, "scheduler": scheduler, "scheduler_overrides": overrides, "call_kwargs": kwargs}

    # ------------------------------------------------------------------ building and saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``DiffusionPipeline.from_pretrained``; a local folder missing a component's subfolder is an error
        naming that component."""
        if os.path.isdir(os.fspath(pretrained_model_name_or_path)):
            _check_component_folders(pretrained_model_name_or_path, cls._get_signature_keys(cls)[0], passed=kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_teacher(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        timestep: int | None = None,
        prediction_type: str | None = None,
        guidance_scale: float = 1.0,
        output_bound: str | None = None,
        **kwargs,
    ) -> "FDOneStepPipeline":
        """Build a one-step pipeline from a multi-step diffusers pipeline (Hub id or local folder).

        The family is detected from ``model_index.json`` (``unet`` / ``transformer`` class); only the
        components the one step needs are loaded (no safety checker, feature extractor, ...). Other
        ``kwargs`` (``dtype``, ``revision``, ``variant``, ``local_files_only``, ``sample_size``,
        components to override, ...) go to ``from_pretrained``; ``dtype`` under the name the installed
        diffusers takes (``FROM_PRETRAINED_DTYPE_KWARG``).

        Raises:
            FileNotFoundError: a local folder that is not a diffusers pipeline (no ``model_index.json``,
                e.g. a bare ``unet/`` model folder), or a local path that does not exist.
            OSError: a Hub id that cannot be loaded (offline and not in the cache, or not found).
        """
        if kwargs.get("dtype") is not None and FROM_PRETRAINED_DTYPE_KWARG != "dtype":
            kwargs[FROM_PRETRAINED_DTYPE_KWARG] = kwargs.pop("dtype")
        config = _teacher_model_index(
            pretrained_model_name_or_path,
            {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs},
        )
        owners = [adapter for adapter in FAMILY_ADAPTERS.values() if adapter.owns_model_index(config)]
        if not owners:
            for slot in ("unet", "transformer"):
                entry = config.get(slot)
                if isinstance(entry, (list, tuple)) and entry[1] is not None:
                    raise ValueError(
                        f"{pretrained_model_name_or_path}: unsupported {slot} class {entry[1]} "
                        f"(pipeline {config.get('_class_name')}); supported families: {_supported_text()}."
                    )
            raise ValueError(
                f"{pretrained_model_name_or_path}: model_index.json has no `unet` or `transformer`; supported "
                f"families: {_supported_text()}."
            )
        owners[0].check_model_index(config, pretrained_model_name_or_path)
        family = owners[0].name
        return cls.from_pretrained(
            pretrained_model_name_or_path,
            family=family,
            timestep=timestep,
            prediction_type=prediction_type,
            guidance_scale=guidance_scale,
            output_bound=output_bound,
            **kwargs,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """``DiffusionPipeline.save_pretrained`` plus this pipeline file, so the folder (or a Hub repo made of it)
        loads with ``FDOneStepPipeline.from_pretrained(dir)`` and with stock
        ``DiffusionPipeline.from_pretrained(dir, custom_pipeline="pipeline_fd_onestep", trust_remote_code=True)``.

        A denoiser carrying a LoRA (``add_lora_to_denoiser``, ``load_lora_weights``) is saved with the LoRA fused
        into a copy of its weights (:meth:`save_one_step`; the live model keeps its adapters): the folder is a
        plain full model that ``from_pretrained`` loads and that gives the same images. To keep the LoRA
        separate (a few MB, loaded onto the base model), use :meth:`save_lora`.
        """
        if _has_peft_adapters(self.denoiser):
            logger.info("save_pretrained: the denoiser's LoRA is fused into the saved weights (save_lora keeps it "
                        "separate).")
            self.save_one_step(save_directory, **kwargs)
            return
        super().save_pretrained(save_directory, **kwargs)
        source = inspect.getsourcefile(type(self)) or __file__
        target = os.path.join(save_directory, PIPELINE_FILE_NAME)
        if os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)

    def _settings(self) -> dict:
        keys = ("family", "timestep", "prediction_type", "guidance_scale", "output_bound", "sample_size",
                "null_class_label", "max_sequence_length", "force_zeros_for_empty_prompt", "complex_human_instruction",
                "is_distilled")
        return {k: self.config[k] for k in keys}

    def with_denoiser(self, denoiser: torch.nn.Module) -> "FDOneStepPipeline":
        """A pipeline sharing every component but the denoiser (e.g. a trained copy)."""
        components = {k: v for k, v in self.components.items()}
        components[self.denoiser_slot] = denoiser
        return type(self)(**components, **self._settings())

    def save_one_step(self, save_directory: str | os.PathLike, denoiser: torch.nn.Module | None = None, **kwargs) -> str:
        """Save the pipeline with ``denoiser`` (default: its own) as a plain full model.

        A denoiser carrying LoRA adapters is merged into a copy first (the live model is untouched).
        """
        import copy

        model = self.denoiser if denoiser is None else denoiser
        if _has_peft_adapters(model):
            model = copy.deepcopy(model)
            _merge_and_remove_lora(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the conditioning warning was already given for this pipeline
            pipe = self if model is self.denoiser else self.with_denoiser(model)
        pipe.save_pretrained(save_directory, **kwargs)
        return str(save_directory)

    # ------------------------------------------------------------------ LoRA
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict,
        adapter_name: str | None = None,
        weight_name: str | None = None,
        **kwargs,
    ):
        """Load a LoRA (diffusers format, see the module docstring) into the denoiser.

        Families with a diffusers LoRA loader (the adapter's ``lora_loader``: sd, sdxl, sd3, flux, sana): that
        loader (its key conversions included; text-encoder LoRA weights in the file are ignored with a warning,
        the one step uses the denoiser only). "unet2d" / "dit": PEFT ``inject_adapter_in_model`` +
        ``set_peft_model_state_dict``.
        """
        adapter_name = adapter_name or _next_adapter_name(self.denoiser)
        self.adapter.load_lora(pretrained_model_name_or_path_or_dict, adapter_name, weight_name=weight_name, **kwargs)

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: list[str] | None = None):
        """Merge the loaded LoRA(s) into the denoiser weights (``unfuse_lora`` restores them)."""
        model = self.denoiser
        if not _has_peft_adapters(model):
            raise ValueError("no LoRA is loaded: call load_lora_weights(...) before fuse_lora().")
        if hasattr(model, "fuse_lora"):
            model.fuse_lora(lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names)
        else:
            _merge_lora(model, lora_scale, safe_fusing, adapter_names)

    def unfuse_lora(self):
        """Undo ``fuse_lora`` (the adapters stay loaded)."""
        model = self.denoiser
        if hasattr(model, "unfuse_lora"):
            model.unfuse_lora()
        else:
            from peft.tuners.tuners_utils import BaseTunerLayer

            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.unmerge()

    def unload_lora_weights(self):
        """Remove all LoRA layers from the denoiser (the base weights stay as they are: unfuse first)."""
        model = self.denoiser
        if hasattr(model, "unload_lora"):
            if _has_peft_adapters(model):
                model.unload_lora()
            return
        from diffusers.utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(model)
        if hasattr(model, "peft_config"):
            del model.peft_config

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        denoiser_lora_layers: dict,
        family: str,
        weight_name: str | None = None,
        lora_config=None,
        is_main_process: bool = True,
        safe_serialization: bool = True,
    ) -> str:
        """Write a denoiser LoRA (PEFT state dict, e.g. ``denoiser_lora_state_dict(model)``) in diffusers' format.

        Args:
            family: the pipeline family (a key of ``FAMILY_ADAPTERS``).
            lora_config: the PEFT ``LoraConfig`` (or its dict); stored as ``lora_adapter_metadata``.
        Returns the path of the written file (``<dir>/pytorch_lora_weights.safetensors`` by default).
        """
        if family not in FAMILY_ADAPTERS:
            raise ValueError(f"unknown family {family!r}; supported: {', '.join(FAMILY_ADAPTERS)}.")
        weight_name = weight_name or LORA_WEIGHT_NAME
        meta = None
        if lora_config is not None:
            meta = lora_config.to_dict() if hasattr(lora_config, "to_dict") else dict(lora_config)
            meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        return FAMILY_ADAPTERS[family].save_lora(save_directory, denoiser_lora_layers, meta, weight_name,
                                                 is_main_process, safe_serialization)

    def save_lora(self, save_directory: str | os.PathLike, adapter_name: str = "default", **kwargs) -> str:
        """Save this pipeline's denoiser LoRA ``adapter_name`` (see ``save_lora_weights``)."""
        config = getattr(self.denoiser, "peft_config", {}).get(adapter_name)
        return self.save_lora_weights(
            save_directory, denoiser_lora_state_dict(self.denoiser, adapter_name), family=self.family,
            lora_config=config, **kwargs,
        )


# --------------------------------------------------------------------------------------------------
# PEFT plumbing for denoisers without a diffusers LoRA loader (UNet2DModel, DiT)
# --------------------------------------------------------------------------------------------------
def _next_adapter_name(model) -> str:
    existing = getattr(model, "peft_config", None) or {}
    i = 0
    while f"default_{i}" in existing:
        i += 1
    return f"default_{i}"


def _merge_lora(model, lora_scale=1.0, safe_fusing=False, adapter_names=None):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            if lora_scale != 1.0:
                module.scale_layer(lora_scale)
            module.merge(safe_merge=safe_fusing, adapter_names=adapter_names)


def _merge_and_remove_lora(model):
    """Fold every adapter into the base weights and drop the LoRA layers (in place)."""
    from diffusers.utils import recurse_remove_peft_layers

    _merge_lora(model)
    recurse_remove_peft_layers(model)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attr):
            delattr(model, attr)


def _read_peft_lora(path_or_dict, weight_name=None, **kwargs):
    """(state dict with prefixed keys, LoraConfig dict or None) from a dict, a file, a folder or a Hub repo."""
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict), None
    from diffusers.utils import _get_model_file
    from safetensors import safe_open

    path = str(path_or_dict)
    if os.path.isfile(path):
        file = path
    else:
        file = _get_model_file(
            path,
            weights_name=weight_name or LORA_WEIGHT_NAME,
            cache_dir=kwargs.get("cache_dir"),
            force_download=kwargs.get("force_download", False),
            proxies=kwargs.get("proxies"),
            local_files_only=kwargs.get("local_files_only"),
            token=kwargs.get("token"),
            revision=kwargs.get("revision"),
            subfolder=kwargs.get("subfolder"),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
        )
    with safe_open(file, framework="pt") as f:
        meta = f.metadata() or {}
        state_dict = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta[LORA_METADATA_KEY]) if LORA_METADATA_KEY in meta else None
    return state_dict, config


def _load_peft_lora(model, state_dict, config, prefix, adapter_name):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    keyed = {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    if not keyed:
        raise ValueError(
            f"no LoRA weights with prefix `{prefix}.` found; this file is not a {prefix} LoRA in diffusers' format "
            f"(keys like `{prefix}.<module>.lora_A.weight`)."
        )
    if config is None:
        # infer rank and targets from the weights (alpha = rank: scale 1)
        ranks = {k.split(".lora_A")[0]: v.shape[0] for k, v in keyed.items() if ".lora_A" in k}
        r = max(ranks.values())
        config = {"r": r, "lora_alpha": r, "target_modules": sorted(ranks), "rank_pattern": {
            k: v for k, v in ranks.items() if v != r}}
    config = {k[len(prefix) + 1 :] if k.startswith(prefix + ".") else k: v for k, v in config.items()}
    for key in ("peft_type", "task_type", "base_model_name_or_path", "revision", "auto_mapping"):
        config.pop(key, None)
    lora_config = LoraConfig(**{k: v for k, v in config.items() if k in inspect.signature(LoraConfig).parameters})
    had_adapters = _has_peft_adapters(model)
    try:
        inject_adapter_in_model(lora_config, model, adapter_name=adapter_name)
        result = set_peft_model_state_dict(model, keyed, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", None) or []
        lora_unexpected = [k for k in unexpected if "lora_" in k]
        if lora_unexpected:
            raise ValueError(f"LoRA weights do not match the model: unexpected keys {lora_unexpected[:5]}.")
    except (ValueError, RuntimeError) as err:
        # a failed load leaves no half-loaded (untrained) adapter behind, nor LoRA layers where there were none
        if had_adapters:
            from peft.tuners.tuners_utils import delete_adapter

            delete_adapter(model, adapter_name=adapter_name, prefix="lora_")
        else:
            from diffusers.utils import recurse_remove_peft_layers

            recurse_remove_peft_layers(model)
        raise ValueError(f"this LoRA does not fit the {prefix} ({type(model).__name__}): {err} Load a LoRA trained "
                         "on this base model (fd_onestep_lora.json names it).") from None
    _peft_configs(model)[adapter_name] = lora_config
