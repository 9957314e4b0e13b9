"""Memory savers for the differentiable VAE decode of a one-step generator.

At real size the decode with gradient costs more memory than the denoiser (an SDXL VAE decode at 1024 px
holds about 2x the UNet's activations). Three savers, each a training-script flag and a ``fd-onestep plan``
flag of the same name; all three give the loss exactly the full decode's value:

- ``--vae_gradient_checkpointing``: diffusers' own switch (``vae.enable_gradient_checkpointing()``); the
  decoder's mid and up blocks recompute their activations in backward.
- ``--decode_micro_batch_size N``: the decode runs N latents at a time, each chunk under
  ``torch.utils.checkpoint`` (only the chunk's input is kept; backward recomputes one chunk at a time), so the
  decoder's activations are held for N samples, not the whole batch. Cost: one more decoder forward.
- ``--surrogate_decoder PATH``: x = tiny(z) + stop_grad(full(z) - tiny(z)). The value is the full decode
  (computed without gradient); the gradient flows through a small decoder (diffusers' ``AutoencoderTiny``),
  so only its activations are held. Only the gradient is approximate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class DecodeSavers:
    """The decode's memory savers. ``micro_batch_size``: latents per decoder call (None: all at once).
    ``surrogate``: an ``AutoencoderTiny`` whose decoder carries the gradient (None: the full decoder's)."""

    micro_batch_size: int | None = None
    surrogate: torch.nn.Module | None = None

    @property
    def active(self) -> bool:
        return self.micro_batch_size is not None or self.surrogate is not None


def vae_decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents (B, c, h, w) -> images (B, C, H, W) float32, through ``vae`` (an ``AutoencoderKL``,
    ``AutoencoderTiny`` or any diffusers VAE with ``decode`` and a ``scaling_factor`` / ``shift_factor`` config),
    as the stock pipelines call it: ``vae.decode(latents / scaling_factor + shift_factor)`` in the VAE's dtype."""
    cfg = vae.config
    latents = latents / cfg.scaling_factor
    if cfg.get("shift_factor", None) is not None:
        latents = latents + cfg.shift_factor
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()


def decode_in_micro_batches(decode, latents: torch.Tensor, micro_batch_size: int | None) -> torch.Tensor:
    """``decode(latents)`` in chunks of ``micro_batch_size`` rows, each chunk checkpointed when gradients are on.

    The same values as one call (the decoders are per-sample maps); with gradient, only one chunk's
    activations are alive at a time (forward keeps the chunk inputs; backward recomputes chunk by chunk).
    """
    if micro_batch_size is None:
        return decode(latents)
    # chunked and checkpointed at any batch size (one chunk too): the memory per sample is the same at every batch
    chunks = latents.split(int(micro_batch_size))
    if torch.is_grad_enabled() and latents.requires_grad:
        return torch.cat([checkpoint(decode, chunk, use_reentrant=False) for chunk in chunks])
    return torch.cat([decode(chunk) for chunk in chunks])


def surrogate_decode(full_decode, tiny_decode, latents: torch.Tensor) -> torch.Tensor:
    """x = tiny(z) + stop_grad(full(z) - tiny(z)): the value of ``full_decode(z)``, the gradient of ``tiny_decode``.

    ``full_decode`` runs without gradient (none of its activations are kept).
    """
    with torch.no_grad():
        full = full_decode(latents)
    if not (torch.is_grad_enabled() and latents.requires_grad):
        return full
    tiny = tiny_decode(latents)
    if tiny.shape != full.shape:
        raise ValueError(f"the surrogate decoder gives images of shape {tuple(tiny.shape)} but the VAE gives "
                         f"{tuple(full.shape)}: pass the tiny decoder made for this teacher's latents.")
    return tiny + (full - tiny).detach()


def decode_with_savers(full_decode, latents: torch.Tensor, savers: DecodeSavers) -> torch.Tensor:
    """Images (B, C, H, W) float32 from model-space latents with ``savers`` applied.

    ``full_decode``: the teacher's decode, latents -> images (``FDOneStepPipeline.decode_latents``).
    """

    def full(z):
        return decode_in_micro_batches(full_decode, z, savers.micro_batch_size)

    if savers.surrogate is None:
        return full(latents)
    surrogate = savers.surrogate

    def tiny(z):
        return decode_in_micro_batches(lambda c: vae_decode(surrogate, c), z, savers.micro_batch_size)

    return surrogate_decode(full, tiny, latents)


def _local_or_cached(name_or_path: str, cache_dir=None) -> bool:
    """Whether ``name_or_path`` is a local path, or a Hub id whose ``config.json`` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    if os.path.exists(os.path.expanduser(name_or_path)) or name_or_path.count("/") != 1:
        return True
    try:
        return isinstance(try_to_load_from_cache(name_or_path, "config.json", cache_dir=cache_dir), str)
    except ValueError:  # not a valid repo id: the message about AutoencoderTiny folders fits it
        return True


def load_surrogate_decoder(name_or_path: str, *, device=None, dtype=None, **load_kwargs) -> torch.nn.Module:
    """An ``AutoencoderTiny`` (folder or Hub id, e.g. ``madebyollin/taesdxl``), frozen, on ``device``."""
    from diffusers import AutoencoderTiny

    try:
        tiny = AutoencoderTiny.from_pretrained(name_or_path, **load_kwargs)
    except (OSError, ValueError) as err:
        if not _local_or_cached(name_or_path, load_kwargs.get("cache_dir")):
            offline = os.environ.get("HF_HUB_OFFLINE", "0")
            raise ValueError(
                f"--surrogate_decoder '{name_or_path}' is a Hub id that is not in the local Hugging Face cache and "
                f"could not be downloaded ({str(err).splitlines()[0]}; offline: HF_HUB_OFFLINE={offline}). Download "
                f"it once with network (`hf download {name_or_path}`) and run with the same HF_HOME, or pass the path "
                "of a local AutoencoderTiny folder."
            ) from None
        raise ValueError(
            f"--surrogate_decoder '{name_or_path}' is not an AutoencoderTiny folder or Hub id ({str(err).splitlines()[0]}). "
            "Pass a tiny decoder for the teacher's latents, e.g. madebyollin/taesd (SD 1.x), madebyollin/taesdxl (SDXL), "
            "madebyollin/taesd3 (SD3), madebyollin/taef1 (FLUX), or one distilled with train_scripts/train_tiny_decoder.py."
        ) from None
    tiny.requires_grad_(False)
    tiny.eval()
    return tiny.to(device=device, dtype=dtype)


def check_surrogate_fits(tiny: torch.nn.Module, vae: torch.nn.Module) -> None:
    """The tiny decoder must read the teacher's latents and write its images (channels), or fail with one line."""
    lat, out = int(tiny.config.latent_channels), int(tiny.config.out_channels)
    # AutoencoderDC (SANA) has no out_channels: it writes the images it reads (in_channels)
    want_lat = int(vae.config.latent_channels)
    want_out = int(vae.config.get("out_channels", None) or vae.config.get("in_channels"))
    if (lat, out) != (want_lat, want_out):
        raise ValueError(
            f"--surrogate_decoder has {lat} latent / {out} image channels but the teacher's VAE has {want_lat} / "
            f"{want_out}: pass the tiny decoder made for this teacher's latents."
        )
