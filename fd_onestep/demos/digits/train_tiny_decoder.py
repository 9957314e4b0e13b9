"""``python -m fd_onestep.demos.digits.train_tiny_decoder --output_dir DIR``: the digits-text teacher's tiny
decoder (``TEXT_TEACHER_TINY_DECODER_PATH``, the surrogate decoder of ``--surrogate_decoder``), distilled on the digits'
training split with :func:`fd_onestep.training.tiny_decoder.distill_tiny_decoder` (16 channels per level).

    python -m fd_onestep.demos.digits.train_tiny_decoder --max_train_steps 3000 --num_cpu_threads 1 --output_dir DIR
"""

from __future__ import annotations

import argparse
import logging

from fd_onestep.training.tiny_decoder import add_distillation_args, distill_tiny_decoder, print_summary

DIGITS_CHANNELS = 16  # per level: the digits teacher's VAE is tiny


def parse_args(input_args=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fd_onestep.demos.digits.train_tiny_decoder",
                                description=__doc__.splitlines()[0])
    add_distillation_args(p, default_channels=DIGITS_CHANNELS)
    return p.parse_args(input_args)


def load_vae_and_images():
    """The bundled digits-text teacher's VAE and the digits' training split in [-1, 1]."""
    from diffusers import AutoencoderKL

    from . import TEXT_TEACHER_PATH, load_digits_split

    vae = AutoencoderKL.from_pretrained(TEXT_TEACHER_PATH, subfolder="vae")
    images, _ = load_digits_split("train")
    return vae, images


def main(args) -> dict:
    return distill_tiny_decoder(args, load_vae_and_images, default_channels=DIGITS_CHANNELS)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print_summary(main(parse_args()))
