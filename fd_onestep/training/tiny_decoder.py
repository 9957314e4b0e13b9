"""Distilling a tiny decoder (diffusers' ``AutoencoderTiny``) for a teacher's VAE: the surrogate decoder of
``train_fd_onestep.py --surrogate_decoder``. ``train_scripts/train_tiny_decoder.py`` runs it on any teacher and image
set; ``python -m fd_onestep.demos.digits.train_tiny_decoder`` on the bundled digits-text teacher.

Only the decoder is trained, to match the full VAE decode of the teacher's model-space latents (the latents the
one-step generator produces): images are encoded by the teacher's VAE, scaled as the denoiser sees them, and,
half the time, perturbed with Gaussian noise so that off-manifold latents (an early student's) are covered too.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def add_distillation_args(p: argparse.ArgumentParser, default_channels: int = 64) -> None:
    """The options every tiny-decoder distillation shares (the output folder, the decoder's shape, the training)."""
    p.add_argument("--output_dir", required=True, help="Where the AutoencoderTiny is saved (save_pretrained).")
    p.add_argument("--decoder_block_out_channels", type=int, nargs="+", default=None,
                   help="One entry per resolution level (levels = log2(VAE scale factor) + 1). "
                        f"Default: {default_channels} each.")
    p.add_argument("--num_decoder_blocks", type=int, nargs="+", default=None,
                   help="Blocks per level. Default: TAESD's (3, 3, 3, 1) for 4 levels, 1 each otherwise.")
    p.add_argument("--max_train_steps", type=int, default=2000)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--latent_noise", type=float, default=0.5,
                   help="Std of the noise added to half of the latents (in units of the latents' std).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_cpu_threads", type=int, default=None)


def model_space_latents(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, c, h, w) float32: the latents as the denoiser sees them ((z - shift) * scaling), posterior means."""
    cfg = vae.config
    out = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            z = vae.encode(chunk).latent_dist.mean
            if cfg.get("shift_factor", None) is not None:
                z = z - cfg.shift_factor
            out.append(z * cfg.scaling_factor)
    return torch.cat(out)


def tiny_config(vae, args, default_channels: int = 64) -> dict:
    """The ``AutoencoderTiny`` config for ``vae``: its levels and channels, the decoder's shape from ``args``."""
    levels = len(vae.config.block_out_channels)
    channels = args.decoder_block_out_channels or [default_channels] * levels
    blocks = args.num_decoder_blocks or ([3, 3, 3, 1] if levels == 4 else [1] * levels)
    if len(channels) != levels or len(blocks) != levels:
        raise ValueError(f"the teacher's VAE has {levels} resolution levels (scale factor {2 ** (levels - 1)}): pass "
                         f"{levels} values to --decoder_block_out_channels and --num_decoder_blocks.")
    return dict(
        in_channels=int(vae.config.out_channels), out_channels=int(vae.config.out_channels),
        latent_channels=int(vae.config.latent_channels),
        # the encoder is never used for the surrogate gradient: the smallest one that builds
        encoder_block_out_channels=[8] * levels, num_encoder_blocks=[1] * levels,
        decoder_block_out_channels=list(channels), num_decoder_blocks=list(blocks),
        # model-space latents in, as pipelines call an AutoencoderTiny (scaling_factor 1, no shift)
        scaling_factor=1.0, shift_factor=0.0,
    )


def distill_tiny_decoder(args, load_vae_and_images: Callable[[], tuple], default_channels: int = 64) -> dict:
    """Seed, load the teacher's VAE and images (N, C, H, W) in [-1, 1] with ``load_vae_and_images()``, distill the
    tiny decoder, save it and its log (``tiny_decoder_training_log.json``) to ``args.output_dir``; returns the log."""
    from diffusers import AutoencoderTiny

    from fd_onestep.memory_savers import vae_decode

    if args.num_cpu_threads:
        torch.set_num_threads(args.num_cpu_threads)
    torch.manual_seed(args.seed)
    vae, images = load_vae_and_images()
    vae.requires_grad_(False).eval()
    latents = model_space_latents(vae, images)
    with torch.no_grad():
        targets = torch.cat([vae_decode(vae, z) for z in latents.split(256)])
    tiny = AutoencoderTiny(**tiny_config(vae, args, default_channels))
    tiny.encoder.requires_grad_(False)
    params = [p for p in tiny.decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.max_train_steps) / args.max_train_steps)))
    gen = torch.Generator().manual_seed(args.seed)
    scale = float(latents.std())
    n = latents.shape[0]
    log = []
    for step in range(args.max_train_steps):
        idx = torch.randint(0, n, (args.train_batch_size,), generator=gen)
        z = latents[idx]
        noisy = torch.rand(z.shape[0], 1, 1, 1, generator=gen) < 0.5
        z = torch.where(noisy, z + args.latent_noise * scale * torch.randn(z.shape, generator=gen), z)
        with torch.no_grad():
            target = vae_decode(vae, z)
        loss = F.mse_loss(vae_decode(tiny, z), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == args.max_train_steps - 1:
            log.append({"step": step, "mse": float(loss.detach())})
            logger.info("step %d mse %.5f", step, log[-1]["mse"])
    # held-out check: the full decode of the clean latents
    with torch.no_grad():
        pred = torch.cat([vae_decode(tiny, z) for z in latents.split(256)])
    result = {"train_mse_last": log[-1]["mse"], "clean_latents_mse": float(F.mse_loss(pred, targets)),
              "clean_latents_max_abs": float((pred - targets).abs().max()),
              "decoder_parameters": sum(p.numel() for p in tiny.decoder.parameters()), "log": log,
              "args": {k: v for k, v in vars(args).items()}}
    out = Path(args.output_dir)
    tiny.save_pretrained(out)
    (out / "tiny_decoder_training_log.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_summary(result: dict) -> None:
    print(json.dumps({k: v for k, v in result.items() if k not in ("log", "args")}, indent=2))
