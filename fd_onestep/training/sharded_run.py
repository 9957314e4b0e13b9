"""The training script's sharded (FSDP2) run: the prepared denoiser, gradient clipping, the prompt store.

The library parts are :mod:`fd_onestep.training.sharding` (the FSDP2 route, sharded checkpoints, gathering) and
:mod:`fd_onestep.prompt_store`; this module wires them into ``train_scripts/train_fd_onestep.py`` so that the
script calls each in a line (docs/several_gpus.md).

A run is sharded when it has several processes and an FSDP2 configuration: ``accelerate launch --use_fsdp
--fsdp_version 2 --num_processes N ...`` (or ``--config_file configs/accelerate_fsdp2_8gpu.yaml``). On GPUs
accelerate builds the plugin; on CPU (``Accelerator(cpu=True)``, gloo) it drops it without a word, and
:func:`fd_onestep.training.sharding.enable_fsdp2` sets it from the same launch environment, so the same launch
command shards there too: the tests' route.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fd_onestep.errors import RunError

__all__ = ["sharding_requested", "prepare_denoiser", "build_prompt_store", "clip_gradients"]


def sharding_requested(accelerator) -> bool:
    """Whether this launch shards the denoiser (several processes and an FSDP configuration)."""
    from accelerate.utils import DistributedType

    from fd_onestep.training.sharding import fsdp2_requested

    return accelerator.num_processes > 1 and (accelerator.distributed_type == DistributedType.FSDP
                                              or fsdp2_requested())


def prepare_denoiser(accelerator, gen, optimizer, lr_scheduler, trainable):
    """``accelerator.prepare`` of the denoiser, optimizer and schedule, sharded block by block under FSDP2.

    Returns ``(denoiser, optimizer, lr_scheduler, trainable)``: ``trainable`` re-read from the prepared denoiser,
    since ``fully_shard`` replaces the parameters by sharded ones (the optimizer was pointed at them by prepare;
    the generator EMA must be built from these).
    """
    from fd_onestep.training.sharding import enable_fsdp2

    sharded = enable_fsdp2(accelerator, gen.denoiser)
    denoiser, optimizer, lr_scheduler = accelerator.prepare(gen.denoiser, optimizer, lr_scheduler)
    if sharded:
        trainable = [p for p in denoiser.parameters() if p.requires_grad]
    return denoiser, optimizer, lr_scheduler, trainable


def build_prompt_store(args, accelerator, pipe, prompts, weight_dtype=None):
    """Text-to-image: every distinct prompt encoded once (the work split over the processes) into
    ``--prompt_embeddings_dir`` (default ``DIR/prompt_embeddings``), reused by a resumed run or a run with the same
    prompts and text encoders. None for other models.

    The text encoders go to the device in ``weight_dtype`` for the encoding; pass the store to the
    ``OneStepGenerator`` (its rows replace the in-memory cache), then take them off the device with
    :func:`fd_onestep.prompt_store.offload_text_encoders` for the rest of the run.
    """
    from fd_onestep.prompt_store import PromptStore, text_encoder_digest, text_encoder_names

    if prompts is None or not pipe.is_text_conditional:
        return None
    for name in text_encoder_names(pipe):
        getattr(pipe, name).requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype)
    from fd_onestep.training.representations import demo_of

    demo = demo_of(args)  # a demo's comparison asks for its own prompts (digits-text: held-out phrasings)
    prompts = [*prompts, *((getattr(demo, "comparison_prompts", lambda: None)() or []) if demo is not None else [])]
    folder = Path(args.prompt_embeddings_dir or Path(args.output_dir) / "prompt_embeddings")
    extra = {"guidance_scale": pipe.config.guidance_scale, "family": pipe.family, "dtype": str(weight_dtype)}
    with torch.no_grad():
        return PromptStore.build(
            folder, prompts, lambda chunk: pipe.encode_conditioning(prompt=chunk, device=accelerator.device),
            encoders_digest=text_encoder_digest(pipe, extra=extra), accelerator=accelerator)


def clip_gradients(accelerator, denoiser, trainable, max_norm: float) -> torch.Tensor:
    """``accelerator.clip_grad_norm_`` of the trainable parameters; sharded: torch's DTensor-aware
    ``clip_grad_norm_`` over the local gradient shards (the norm reduced over the processes), since accelerate's
    FSDP branch clips only a list equal to all of a model's parameters (a LoRA's are a subset). Returns the
    total norm before clipping, a plain tensor."""
    from torch.distributed.tensor import DTensor

    from fd_onestep.training.sharding import is_sharded

    if not is_sharded(denoiser):
        return accelerator.clip_grad_norm_(trainable, max_norm)
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
