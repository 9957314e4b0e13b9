#!/usr/bin/env python
"""Distill a tiny decoder (diffusers' ``AutoencoderTiny``) for a teacher's VAE: the surrogate decoder of
``train_fd_onestep.py --surrogate_decoder``.

    python train_scripts/train_tiny_decoder.py --pretrained_model_name_or_path <teacher folder or hub id> \\
        --dataset <datasets id or folder> --resolution 1024 --output_dir tiny-decoder

The bundled digits-text teacher's is made by ``python -m fd_onestep.demos.digits.train_tiny_decoder``.
Only the decoder is trained, to match the full VAE decode of the teacher's model-space latents
(:mod:`fd_onestep.training.tiny_decoder`). Published tiny decoders exist for SD (madebyollin/taesd), SDXL (taesdxl),
SD3 (taesd3) and FLUX (taef1).
"""

from __future__ import annotations

import argparse
import logging

import torch

from fd_onestep.training.tiny_decoder import add_distillation_args, distill_tiny_decoder, print_summary


def parse_args(input_args=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="Teacher pipeline folder or Hub id (its vae/ is distilled).")
    p.add_argument("--dataset", required=True,
                   help="Images: a datasets id or folder (the images whose latents the decoder learns).")
    p.add_argument("--image_column", default="image")
    p.add_argument("--resolution", type=int, default=None, help="Center-crop-resize images to this size.")
    p.add_argument("--max_images", type=int, default=None, help="Use at most this many images.")
    add_distillation_args(p)
    return p.parse_args(input_args)


def load_vae_and_images(args):
    """The teacher's VAE (float32) and images (N, C, H, W) in [-1, 1]."""
    from datasets import load_dataset
    from diffusers import AutoencoderKL

    from fd_onestep.images import center_crop_resize, pil_to_rgb, pil_to_tensor

    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae")
    ds = load_dataset(args.dataset, split="train")
    if args.max_images:
        ds = ds.select(range(min(args.max_images, len(ds))))
    size = args.resolution or int(vae.config.sample_size)
    images = torch.stack([pil_to_tensor(center_crop_resize(pil_to_rgb(item[args.image_column]), size)) for item in ds])
    return vae, images  # pil_to_tensor: [-1, 1]


def main(args) -> dict:
    return distill_tiny_decoder(args, lambda: load_vae_and_images(args))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print_summary(main(parse_args()))
