#!/usr/bin/env python
# Copyright 2025 The fd-onestep authors. Licensed under the Apache License, Version 2.0.
"""Turn a multi-step diffusers model into a one-step generator by optimizing FD-loss.

    accelerate launch train_scripts/train_fd_onestep.py \
        --pretrained_model_name_or_path google/ddpm-cifar10-32 \
        --encoders inception dinov2 --reference_stats stats/inception.safetensors stats/dinov2.safetensors \
        --output_dir ddpm-cifar10-onestep

With no ``--pretrained_model_name_or_path`` / ``--encoders`` / ``--reference_stats`` the script runs the
offline embedded default: the bundled digits teacher, the bundled digit encoders and their reference
statistics (``fd_onestep/demos/digits/assets``), on CPU in minutes, and writes a teacher-vs-student comparison.
``--embedded_default digits-class`` runs the class-conditional one: the bundled class-conditional teacher,
with adherence, per-class FD and FJD in the validation logs and the comparison, and samples per class.

The loss: images = G(noise, cond) (one denoiser forward from pure noise), features f_i = E_i(images) for
every encoder i, L = sum_i w_i F_i / (sg(F_i) + eps_i) with F_i the Fréchet distance between the reference
statistics and the generated *population* (EMA / queue of past batches / exact two-pass large batch) in
which only the current batch carries gradient. Under several processes the population is the global batch
and the parameter gradient equals the single-process gradient of the same global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch

# The script runs on the installed package (pipelines/ becomes fd_onestep.pipelines only through the install).
if importlib.util.find_spec("fd_onestep") is None or importlib.util.find_spec("fd_onestep.pipelines") is None:
    sys.exit("train_fd_onestep.py needs the fd-onestep package installed: run `pip install -e .` (or "
             "`pip install .`) in the repository root, then run the script again.")

from accelerate.logging import get_logger  # noqa: E402

from fd_onestep.training.checkpoints import (  # noqa: E402
    prune_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint_atomically,
)
from fd_onestep.errors import RunError, run_reporting_errors  # noqa: E402
from fd_onestep.training.hub import check_push_to_hub, push_folder_to_hub  # noqa: E402
from fd_onestep.training.model_card import render_model_card, teacher_hub_id, teacher_license  # noqa: E402
from fd_onestep.training.output_dir import (  # noqa: E402
    OutputDirLock,
    check_no_overwrite,
    clear_previous_run,
    honour_umask,
)
from fd_onestep.training.run_args import (  # noqa: E402
    RUN_ARGS_FILE,
    check_checkpoint_compatible,
    check_output_dir_compatible,
    fingerprint_digest,
    parse_float_list,
    parse_name_list,
    public_args,
    run_fingerprint,
    write_run_args,
)
from fd_onestep.training.state import (  # noqa: E402
    CheckpointableGenerator,
    TrainingProgress,
    load_state_file,
    save_state_file,
)

logger = get_logger("train_fd_onestep", log_level="INFO")

# The offline demos' recipes (--embedded_default): each sets the bundled teacher, encoders and statistics and the
# settings that differ from the defaults below; it overrides only what the command line does not give.
from fd_onestep.demos.digits.recipes import RECIPES  # noqa: E402

# Named recipes on top of a digits default (--preset): each fills only the arguments the command line leaves out.
# "quality" is the recipe under study in benchmarks/quality_study.py (docs/quality.md): the main job's settings
# with a 3x longer cosine schedule (warm-up over the first 100 steps) and an EMA of the generator's weights
# (decay 0.998: an average over the last ~500 steps, where the cosine lr is already small), validated and
# checkpointed every 250 steps (12 points of the study's curves), the kept weights still chosen by the training
# encoders' FD_r. Over 3 seeds it puts the kept student below its 20-step teacher in resnet-digits on all three
# demos (unconditional FD 0.95x, per-class FD 0.54x / 0.52x) but not in randcnn-digits (1.39x, 1.18x, 1.14x).
# The levers measured on top of it (an adversarial pixel head, the exact population, a higher learning rate) did
# not improve the training encoders' FD_r, the rule that chooses, and are not in it.
PRESETS = {
    "quality": {
        "max_train_steps": 3000,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 100,
        "use_ema": True,
        "ema_decay": 0.998,
        "validation_steps": 250,
        "checkpointing_steps": 250,
        "keep_best_by": "fd_r_mean",
        "final_weights": "best",
    },
}

POPULATIONS = ("ema", "queue", "exact")
# The fresh-vs-population FD warning needs this many validation samples per feature dimension: with fewer, the
# fresh FD's own small-sample bias (of order d / N) can exceed the population FD of a well-trained generator.
FRESH_FD_MIN_SAMPLES_PER_DIM = 2
FD_CONDITIONS = ("marginal", "joint")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
OUTPUT_BOUND_CHOICES = ("none", "tanh", "clamp")


def _positive_int(value: str) -> int:
    out = int(value)
    if out < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="FD-loss one-step training (see the module docstring and docs/training.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="Multi-step diffusers pipeline (Hub id or folder): DDPM/DDIM UNet2DModel, DiT, Stable "
                        "Diffusion 1.x/2.x, SDXL, SD3, Flux or SANA. Omit (with --encoders and --reference_stats) for the "
                        "offline embedded digits default.")
    g.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    g.add_argument("--variant", type=str, default=None, help="Weights variant, e.g. fp16.")
    g.add_argument("--cache_dir", type=str, default=None,
                   help="Hugging Face cache directory for the teacher, the encoders and the caption dataset.")
    g.add_argument("--local_files_only", action="store_true",
                   help="Never download: the teacher, encoders and datasets come from local folders and caches "
                        "(also implied by HF_HUB_OFFLINE=1).")
    g.add_argument("--onestep_timestep", type=int, default=None,
                   help="Noise level the one step is taken from (DDPM index, or flow timestep). None: the top "
                        "of the schedule.")
    g.add_argument("--prediction_type", type=str, default=None,
                   help="Override the teacher's parameterization (epsilon, v_prediction, sample, flow).")
    g.add_argument("--output_bound", type=str, default=None, choices=OUTPUT_BOUND_CHOICES,
                   help="Bound on the generated image: tanh (smooth, recommended for ill-conditioned maps), "
                        "clamp, or none.")
    g.add_argument("--guidance_scale", type=float, default=1.0,
                   help="Classifier-free guidance inside the one step (1 = off; stored in the pipeline).")
    g.add_argument("--null_class_label", type=int, default=None,
                   help="Class-conditional UNet2DModel teachers trained with a null class (dropped labels, for "
                        "guidance): its label, which must be the last class embedding (DiT: its own, automatic).")
    g.add_argument("--resolution", type=int, default=None,
                   help="Image resolution in pixels (default: the model's sample size).")
    g.add_argument("--max_sequence_length", type=_positive_int, default=None,
                   help="Text tokens of each prompt for families whose stock pipeline takes max_sequence_length (SD3, "
                        "Flux, SANA, FLUX.2; default: the stock pipeline's).")

    g.add_argument("--embedded_default", type=str, default=None, choices=sorted(RECIPES),
                   help="Which offline embedded default runs when no model / encoders / stats are given: digits "
                        "(unconditional, the default), digits-class (class-conditional teacher, adherence, "
                        "per-class FD and FJD, samples per class) or digits-text (a one-step LoRA on the Stable "
                        "Diffusion-family digits teacher, prompts that name the digit).")

    g.add_argument("--preset", type=str, default=None, choices=sorted(PRESETS),
                   help="A named recipe on top of the digits default (with --embedded_default: of that one): quality "
                        "= a longer cosine schedule with an EMA of the generator's weights (see PRESETS and "
                        "docs/quality.md). It fills only the arguments not given on the command line.")

    g = p.add_argument_group("output and logging")
    g.add_argument("--output_dir", type=str, default="fd-onestep-output",
                   help="Where the pipeline, checkpoints, samples, logs and model card go. A folder holding "
                        "checkpoints of a run is continued (--resume_from_checkpoint) or started over "
                        "(--overwrite_output_dir), never silently overwritten.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Start a new run in an --output_dir that holds an earlier run's checkpoints: deletes them "
                        "(and its best/ pipeline) first.")
    g.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard dir, relative to --output_dir.")
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help='Trackers for accelerate ("tensorboard", "wandb", "all" or "none").')
    g.add_argument("--tracker_project_name", type=str, default="fd-onestep", help="Project name for the trackers.")
    g.add_argument("--seed", type=int, default=0, help="Seed for weights-independent randomness (noise, labels).")

    g = p.add_argument_group("optimization")
    g.add_argument("--train_batch_size", type=_positive_int, default=32,
                   help="Samples per process per forward (exact population: per micro-batch).")
    g.add_argument("--max_train_steps", type=_positive_int, default=2000, help="Optimizer steps.")
    g.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1, help="Micro-batches per optimizer step (ema / queue populations).")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Recompute denoiser activations in backward.")
    g.add_argument("--vae_gradient_checkpointing", action="store_true",
                   help="Recompute the VAE decoder's activations in backward (diffusers' enable_gradient_checkpointing). "
                        "Memory savers: docs/memory_savers.md; `fd-onestep plan` says what each one buys.")
    g.add_argument("--decode_micro_batch_size", type=_positive_int, default=None,
                   help="Decode this many latents at a time, each chunk checkpointed: the decoder's activations are "
                        "held for this many samples only (one more decoder forward). Same images.")
    g.add_argument("--surrogate_decoder", type=str, default=None,
                   help="An AutoencoderTiny (folder or Hub id, e.g. madebyollin/taesdxl) for the surrogate decoder "
                        "gradient x = tiny(z) + stop_grad(full(z) - tiny(z)): the loss sees the full decode, the "
                        "gradient flows through the tiny decoder. train_scripts/train_tiny_decoder.py distills one.")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=False,
                   help="Keep the denoiser's convolution weights (and so its activations) in channels_last memory "
                        "format: faster convolutions on CPU (oneDNN) and on tensor-core GPUs; no effect on "
                        "transformer denoisers (the digits recipes: on).")
    g.add_argument("--learning_rate", type=float, default=3e-6, help="Peak learning rate (AdamW).")
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply the learning rate by gradient_accumulation_steps * train_batch_size * processes.")
    g.add_argument("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULERS, help="diffusers' learning-rate schedule.")
    g.add_argument("--lr_warmup_steps", type=int, default=100, help="Linear warm-up steps of the schedule.")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="cosine_with_restarts only.")
    g.add_argument("--lr_power", type=float, default=1.0, help="polynomial only.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    g.add_argument("--adam_fused", action=argparse.BooleanOptionalAction, default=False,
                   help="AdamW's fused kernel (torch.optim.AdamW(fused=True)) instead of its foreach default: the "
                        "same update up to float round-off, fewer passes over the weights (the digits recipe: on).")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (<= 0: no clipping, norm still logged).")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Default: accelerate's config (no on CPU).")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--num_cpu_threads", type=_positive_int, default=None,
                   help="CPU runs: torch threads per process. Default: the cores this process may use divided by "
                        "the processes on this machine (`accelerate launch` without --cpu sets OMP_NUM_THREADS=1, "
                        "which leaves all cores but one idle). Ignored on GPU.")
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the generator weights (used for validation and saving).")
    g.add_argument("--ema_decay", type=float, default=0.9999, help="Generator-weights EMA maximum decay.")
    g.add_argument("--ema_update_after_step", type=int, default=0, help="EMA weights (--use_ema): steps before the first update.")
    g.add_argument("--ema_use_warmup", action="store_true", help="EMA decay warm-up (inv_gamma, power).")
    g.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up inverse gamma (diffusers EMAModel).")
    g.add_argument("--ema_power", type=float, default=2 / 3, help="EMA warm-up power (diffusers EMAModel).")

    g = p.add_argument_group("LoRA (PEFT; base weights frozen)")
    g.add_argument("--use_lora", action="store_true", help="Train a LoRA instead of the full denoiser.")
    g.add_argument("--lora_rank", type=_positive_int, default=8, help="LoRA rank (the digits-text recipe: 16).")
    g.add_argument("--lora_alpha", type=float, default=None, help="Default: the rank (scale 1).")
    g.add_argument("--lora_target_modules", type=str, nargs="+", default=None,
                   help="Module-name suffixes (comma or space separated). Default: per family.")

    g = p.add_argument_group("FD-loss")
    g.add_argument("--encoders", type=str, nargs="+", default=None,
                   help="Encoders of the loss: names (inception, dinov2, siglip, clip, pixels:<size>, pixels-gray:<size>), hub ids or folders.")
    g.add_argument("--reference_stats", type=str, nargs="+", default=None,
                   help="One ReferenceStats file per encoder (.safetensors, or pytorch-fid .npz), same order.")
    g.add_argument("--encoder_loss_weights", type=str, nargs="+", default=None, help="One weight per encoder (default 1 each; embedded: 1 1 2).")
    g.add_argument("--fd_population", type=str, default="ema", choices=POPULATIONS,
                   help="Generated statistics: ema (beta), queue (past batches) or exact (two-pass large batch).")
    g.add_argument("--fd_ema_beta", type=float, default=0.999, help="EMA population decay.")
    g.add_argument("--fd_warmup_samples", type=int, default=10000,
                   help="Warm-start the population from the exact moments of this many generated samples (0: off).")
    g.add_argument("--fd_queue_size", type=_positive_int, default=8192,
                   help="Queue population: past generated samples kept (not batches).")
    g.add_argument("--fd_micro_batches", type=_positive_int, default=4,
                   help="Exact population: micro-batches (of --train_batch_size) per step.")
    g.add_argument("--fd_eps", type=float, default=None,
                   help="Relative eps of the loss normalization, eps_i = fd_eps * tr(sigma_ref_i) (default: the library's).")
    g.add_argument("--inception_weights", type=str, default=None,
                   help="Local FID Inception weights file (pt_inception-2015-12-05-6726825d.pth) for the inception "
                        "encoder, instead of the torch.hub cache / download.")
    g.add_argument("--encoder_autocast", type=str, default="no", choices=["no", "fp16", "bf16"],
                   help="Autocast dtype for the encoders' forward.")
    g.add_argument("--encoder_gradient_checkpointing", action="store_true", help="Recompute encoder activations in backward.")
    g.add_argument("--fd_condition", type=str, default="marginal", choices=FD_CONDITIONS,
                   help="Class-conditional models: match the marginal feature distribution, or the joint one of "
                        "[features, alpha * one_hot(label)] (needs --class_reference_stats).")
    g.add_argument("--fd_label_scale", type=float, default=1.0,
                   help="Joint FD-loss: alpha = this factor times the reference's trace-matching scale (label "
                        "block trace = feature block trace at 1).")
    g.add_argument("--class_reference_stats", type=str, nargs="+", default=None,
                   help="Per-class statistics (`fd-onestep stats --label_column`, *.classes.safetensors), one per "
                        "encoder. Default: <stats>.classes.safetensors next to each --reference_stats file, if there.")
    g.add_argument("--adv_weight", type=float, default=0.0,
                   help="Weight of an adversarial term beside FD-loss: a small discriminator head on the frozen "
                        "features of one training encoder (--adv_encoder), real images' features against the "
                        "generator's (fd_onestep.adversarial). 0: off.")
    g.add_argument("--adv_loss", type=str, default="hinge", choices=["hinge", "nonsaturating"],
                   help="The adversarial term's loss.")
    g.add_argument("--adv_encoder", type=str, default=None,
                   help="The training encoder whose features the discriminator head sees (default: the first).")
    g.add_argument("--adv_real_images", type=str, default=None,
                   help="Folder of real images for the discriminator (the data of the reference statistics). The "
                        "offline digits defaults use the digits train split.")
    g.add_argument("--adv_max_real_images", type=_positive_int, default=10000,
                   help="Real images encoded once at the start (their features stay on the CPU).")
    g.add_argument("--adv_learning_rate", type=float, default=1e-4, help="The discriminator head's AdamW learning rate.")
    g.add_argument("--adv_hidden", type=_positive_int, default=256, help="The discriminator head's hidden width.")
    g.add_argument("--sample_batch_size", type=_positive_int, default=256,
                   help="Per-process batch for no-grad generation (warm start, validation, samples).")

    g = p.add_argument_group("conditioning")
    g.add_argument("--class_label_distribution", type=str, default="uniform", choices=["uniform", "reference"],
                   help="Class-conditional models: uniform labels, or the reference label histogram (from "
                        "--class_histogram or the reference stats' 'class_histogram' metadata).")
    g.add_argument("--class_histogram", type=str, default=None, help="JSON file: list of per-class counts.")
    g.add_argument("--prompts_file", type=str, default=None, help="Text models: training prompts, one per line.")
    g.add_argument("--dataset_name", type=str, default=None, help="Text models: a datasets id/folder with captions.")
    g.add_argument("--dataset_config_name", type=str, default=None, help="Config of --dataset_name.")
    g.add_argument("--dataset_split", type=str, default="train", help="Split of --dataset_name the prompts come from.")
    g.add_argument("--caption_column", type=str, default="text", help="Column of --dataset_name holding the prompts.")
    g.add_argument("--max_prompts", type=int, default=None, help="Use at most this many captions.")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help='A checkpoint folder, or "latest" (the newest complete one in --output_dir, if any).')
    g.add_argument("--stop_after_steps", type=int, default=None,
                   help="Stop this invocation at this global step (after checkpointing), e.g. to fit a job time "
                        "limit; resume later with --resume_from_checkpoint latest.")

    g = p.add_argument_group("validation")
    g.add_argument("--validation_steps", type=int, default=500, help="Validate every N steps (0: only at the end).")
    g.add_argument("--num_validation_images", type=int, default=16, help="Images in the validation grid.")
    g.add_argument("--num_validation_samples", type=int, default=1000,
                   help="Fresh samples for the validation FDs (0: no fresh-sample FD).")
    g.add_argument("--eval_encoders", type=str, nargs="*", default=[],
                   help="Extra encoders for validation only (never in the loss).")
    g.add_argument("--eval_reference_stats", type=str, nargs="*", default=None, help="One stats file per --eval_encoders.")
    g.add_argument("--eval_class_reference_stats", type=str, nargs="*", default=None,
                   help="Per-class statistics per --eval_encoders (default: next to each eval stats file, if there).")
    g.add_argument("--classifier", type=str, default=None,
                   help="Class-conditional models: classifier for adherence in validation and the comparison: "
                        "'digits' (the bundled digit classifier) or a local transformers image-classification folder.")
    g.add_argument("--keep_best_by", type=str, default=None,
                   help="Keep the pipeline with the lowest fresh-sample FD in DIR/best: a training encoder name, "
                        "'fd_mean' or 'fd_r_mean' (mean FD_r over the training encoders).")
    g.add_argument("--final_weights", type=str, default="last", choices=["last", "best"],
                   help="Which weights the pipeline in --output_dir gets at the end.")
    g.add_argument("--fresh_fd_warning_ratio", type=float, default=3.0,
                   help="Warn when fresh-sample FD / population FD exceeds this (only with --num_validation_samples "
                        "of at least twice the encoder's feature dimension: fewer samples bias the fresh FD).")

    g = p.add_argument_group("outputs of the embedded default")
    g.add_argument("--compare_with_teacher", action=argparse.BooleanOptionalAction, default=False,
                   help="At the end, compare teacher (naive one step, multi-step) and student: grid + FD table.")
    g.add_argument("--num_output_samples", type=int, default=0, help="Student samples written to DIR/samples/ as PNG.")
    g.add_argument("--num_comparison_samples", type=int, default=1000, help="Samples per generator for the comparison FDs.")
    g.add_argument("--write_comparison_samples", action=argparse.BooleanOptionalAction, default=False,
                   help="Write every compared generator's samples to DIR/comparison_samples/<generator>/[<label>/].")
    g.add_argument("--teacher_sampler", type=str, default="dpmsolver++", choices=["dpmsolver++", "ddim", "ddpm"],
                   help="The teacher's multi-step sampler in the comparison.")
    g.add_argument("--teacher_num_inference_steps", type=int, default=20, help="Steps of the teacher's multi-step sampler in the comparison.")

    g = p.add_argument_group("Hub")
    g.add_argument("--push_to_hub", action="store_true", help="Upload the output dir (without checkpoints) to --hub_model_id.")
    g.add_argument("--hub_model_id", type=str, default=None, help="Repo id (default: the output dir's name).")
    g.add_argument("--hub_token", type=str, default=None,
                   help="Prefer `hf auth login`: a token on the command line is visible in the shell history.")
    g.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo private.")

    g = p.add_argument_group("debugging")
    g.add_argument("--debug_dump_first_step_grad", type=str, default=None,
                   help="Write the first step's (DDP-averaged, unclipped) gradients of the trainable parameters "
                        "to this safetensors file.")
    g.add_argument("--debug_float64", action="store_true",
                   help="Run the denoiser, VAE and encoders in float64 (slow): checks such as 'N processes give "
                        "the 1-process gradient' then compare the algorithm, not float32 round-off of different "
                        "batch shapes.")
    g.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def label_aliases(args) -> dict[str, str]:
    """Encoder spec -> short name, for specs that have no folder to name them: the offline default's builtin
    digits representations ("pixels-gray:16" -> "pixels-digits"); none for other runs."""
    if not args.embedded_default:
        return {}
    from fd_onestep.demos.digits import BUILTIN_ENCODERS

    return {spec: bundled_name for bundled_name, spec in BUILTIN_ENCODERS.items()}


def encoder_label(name: str, aliases: dict[str, str] | None = None) -> str:
    """Short name of an encoder for logs, metrics and tables: its alias if given (see :func:`label_aliases`),
    its folder name for local paths ("/x/tiny-dinov2" -> "tiny-dinov2"), else the name with path separators
    replaced ("pixels-gray:16" -> "pixels-gray_16")."""
    if aliases and name.strip() in aliases:
        return aliases[name.strip()]
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve().name
    return name.strip().replace("/", "_").replace(":", "_").replace("@", "_")


def encoder_labels(names: list[str], what: str, aliases: dict[str, str] | None = None) -> list[str]:
    labels = [encoder_label(n, aliases) for n in names]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{what} {names} have clashing short names {labels}; rename the folders so they differ.")
    return labels


def embedded_default_of(args) -> str | None:
    """Which offline embedded default runs ("digits" / "digits-class"), or None for a run on the user's model."""
    plain = args.pretrained_model_name_or_path is None and args.encoders is None and args.reference_stats is None
    if args.embedded_default is not None and not plain:
        raise ValueError(
            f"--embedded_default {args.embedded_default} runs the bundled digits assets: drop it, or drop "
            "--pretrained_model_name_or_path / --encoders / --reference_stats."
        )
    return (args.embedded_default or "digits") if plain else None


# a recipe's held-out statistics belong to its held-out encoders: encoders given on the command line keep theirs
TIED_ARGS = {"eval_reference_stats": "eval_encoders"}


def finalize_args(args, given: set[str] = frozenset()) -> argparse.Namespace:
    """Apply the offline demo's recipe, then ``--preset`` (both to the arguments not in ``given``), and validate
    everything that needs no model.

    Raises ValueError / FileNotFoundError naming the argument and the fix.
    """
    args.embedded_default = embedded_default_of(args)
    if args.embedded_default:
        fill_not_given(args, RECIPES[args.embedded_default], given)
    else:
        missing = [n for n in ("pretrained_model_name_or_path", "encoders", "reference_stats") if getattr(args, n) is None]
        if missing:
            raise ValueError(
                "give --pretrained_model_name_or_path, --encoders and --reference_stats together (missing: "
                + ", ".join("--" + m for m in missing)
                + "), or none of them for the offline embedded digits default."
            )
    apply_preset(args, given)
    if args.output_bound == "none":
        args.output_bound = None
    args.encoders = parse_name_list(args.encoders)
    args.reference_stats = parse_name_list(args.reference_stats)
    args.eval_encoders = parse_name_list(args.eval_encoders)
    args.eval_reference_stats = parse_name_list(args.eval_reference_stats)
    args.class_reference_stats = class_stats_paths(args.class_reference_stats, args.reference_stats, "--class_reference_stats")
    args.eval_class_reference_stats = class_stats_paths(args.eval_class_reference_stats, args.eval_reference_stats,
                                                        "--eval_class_reference_stats")
    args.lora_target_modules = parse_name_list(args.lora_target_modules) or None
    if not args.encoders:
        raise ValueError("--encoders is empty: name at least one encoder for the FD-loss.")
    if len(set(args.encoders)) != len(args.encoders):
        raise ValueError(f"--encoders lists an encoder twice: {args.encoders}; name each once.")
    if len(args.reference_stats) != len(args.encoders):
        raise ValueError(
            f"--reference_stats has {len(args.reference_stats)} files for {len(args.encoders)} encoders "
            f"({args.encoders}); pass one stats file per encoder, in the same order."
        )
    if len(args.eval_reference_stats) != len(args.eval_encoders):
        raise ValueError(
            f"--eval_reference_stats has {len(args.eval_reference_stats)} files for {len(args.eval_encoders)} "
            "--eval_encoders; pass one stats file per eval encoder, in the same order."
        )
    overlap = set(args.eval_encoders) & set(args.encoders)
    if overlap:
        raise ValueError(
            f"{sorted(overlap)} are both training and eval encoders; training encoders are always evaluated, "
            "drop them from --eval_encoders."
        )
    for path in [*args.reference_stats, *args.eval_reference_stats]:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"reference statistics file {path!r} does not exist; compute it with `fd-onestep stats` "
                "(one file per encoder) and pass its path."
            )
    weights = parse_float_list(args.encoder_loss_weights, "encoder_loss_weights")
    if weights and len(weights) != len(args.encoders):
        raise ValueError(
            f"--encoder_loss_weights has {len(weights)} values for {len(args.encoders)} encoders; pass one per encoder."
        )
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"--encoder_loss_weights must be finite and >= 0, got {weights}.")
    args.encoder_loss_weights = weights or [1.0] * len(args.encoders)

    if not 0.0 <= args.fd_ema_beta < 1.0:
        raise ValueError(f"--fd_ema_beta must be in [0, 1), got {args.fd_ema_beta}.")
    if args.fd_warmup_samples < 0:
        raise ValueError(f"--fd_warmup_samples must be >= 0, got {args.fd_warmup_samples}.")
    if args.fd_eps is not None and args.fd_eps <= 0:
        raise ValueError(f"--fd_eps must be > 0, got {args.fd_eps}.")
    if args.fd_population == "exact" and args.gradient_accumulation_steps != 1:
        raise ValueError(
            "--fd_population exact already accumulates gradients exactly over --fd_micro_batches; use "
            "--fd_micro_batches instead of --gradient_accumulation_steps (set it to 1)."
        )
    if args.fd_population == "exact" and args.fd_micro_batches < 2:
        raise ValueError("--fd_population exact needs --fd_micro_batches >= 2 (1 is the plain batch: use ema or queue).")
    if args.fd_condition == "joint" and any(path is None for path in args.class_reference_stats):
        missing = [stats for stats, path in zip(args.reference_stats, args.class_reference_stats) if path is None]
        raise ValueError(
            f"--fd_condition joint needs per-class statistics of every training encoder; none found for {missing}. "
            "Compute them with `fd-onestep stats --label_column label ...` and pass --class_reference_stats, or "
            "use --fd_condition marginal."
        )
    if not (math.isfinite(args.fd_label_scale) and args.fd_label_scale > 0):
        raise ValueError(f"--fd_label_scale must be a positive number, got {args.fd_label_scale}.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}.")
    if not (0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1):
        raise ValueError("--adam_beta1 and --adam_beta2 must be in [0, 1).")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError("--checkpoints_total_limit must be >= 1 (omit it to keep every checkpoint).")
    for name in ("checkpointing_steps", "validation_steps", "num_validation_images", "num_validation_samples",
                 "num_output_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.use_ema and not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1), got {args.ema_decay}.")
    aliases = label_aliases(args)
    train_labels = encoder_labels(args.encoders, "--encoders", aliases)
    check_adversarial_args(args, train_labels, dict(zip(args.encoders, train_labels)))
    eval_labels = encoder_labels(args.eval_encoders, "--eval_encoders", aliases)
    if set(train_labels) & set(eval_labels):
        raise ValueError(f"--encoders {train_labels} and --eval_encoders {eval_labels} share short names; rename one.")
    if args.keep_best_by is not None:
        by_raw = dict(zip(args.encoders + args.eval_encoders, train_labels + eval_labels))
        args.keep_best_by = by_raw.get(args.keep_best_by, args.keep_best_by)
        allowed = {"fd_mean", "fd_r_mean", *train_labels}
        if args.keep_best_by in eval_labels:
            raise ValueError(
                f"--keep_best_by {args.keep_best_by!r} is an eval-only encoder: selecting checkpoints with it would "
                "tune the held-out measure. Use a training encoder, 'fd_mean' or 'fd_r_mean'."
            )
        if args.keep_best_by not in allowed:
            raise ValueError(f"--keep_best_by {args.keep_best_by!r} is unknown; use one of {sorted(allowed)}.")
        if not args.num_validation_samples:
            raise ValueError("--keep_best_by needs fresh-sample FDs: set --num_validation_samples > 0.")
    if args.final_weights == "best" and args.keep_best_by is None:
        raise ValueError("--final_weights best needs --keep_best_by (which FD decides what is best).")
    if args.prompts_file is not None and args.dataset_name is not None:
        raise ValueError("give either --prompts_file or --dataset_name for the prompts, not both.")
    if args.prompts_file is not None and not Path(args.prompts_file).is_file():
        raise FileNotFoundError(f"--prompts_file {args.prompts_file!r} does not exist; pass a text file, one prompt per line.")
    if args.class_histogram is not None and not Path(args.class_histogram).is_file():
        raise FileNotFoundError(f"--class_histogram {args.class_histogram!r} does not exist; pass a JSON list of counts.")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed_precision fp16 needs a CUDA GPU; on CPU use bf16 or no.")
    if args.resolution is not None and args.resolution < 1:
        raise ValueError(f"--resolution must be >= 1, got {args.resolution}.")
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise ValueError("--stop_after_steps must be >= 1.")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ValueError(
            f"--output_dir {args.output_dir!r} is a file, not a folder; pass a new or existing folder for the "
            "pipeline, checkpoints and samples."
        )
    from fd_onestep.cli import check_output_path

    check_output_path(args.output_dir, "--output_dir", folder=True)
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        raise ValueError("--overwrite_output_dir starts the run over and --resume_from_checkpoint continues it; "
                         "pass one of the two.")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        raise FileNotFoundError(
            f"--inception_weights {args.inception_weights!r} does not exist; pass the path of "
            "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID Inception weights)."
        )
    if args.report_to == "none":
        args.report_to = None
    return args


def check_adversarial_args(args, train_labels: list[str], labels_of: dict[str, str]) -> None:
    """``--adv_*``: the weight, the encoder (a training one: the held-out ones only judge) and the real images."""
    if not (math.isfinite(args.adv_weight) and args.adv_weight >= 0):
        raise ValueError(f"--adv_weight must be a finite number >= 0 (0: off), got {args.adv_weight}.")
    if args.adv_weight == 0:
        return
    if args.adv_encoder is None:
        args.adv_encoder = train_labels[0]
    args.adv_encoder = labels_of.get(args.adv_encoder, args.adv_encoder)
    if args.adv_encoder not in train_labels:
        raise ValueError(f"--adv_encoder {args.adv_encoder!r} is not a training encoder ({train_labels}): the "
                         "discriminator sees a training representation (held-out ones only judge).")
    if args.adv_real_images is None and not args.embedded_default:
        raise ValueError("--adv_weight > 0 needs real images for the discriminator: pass --adv_real_images FOLDER "
                         "(the images the reference statistics were computed from).")
    if args.adv_real_images is not None and not Path(args.adv_real_images).is_dir():
        raise FileNotFoundError(f"--adv_real_images {args.adv_real_images!r} is not a folder; pass a folder of images.")
    if not args.adv_learning_rate > 0:
        raise ValueError(f"--adv_learning_rate must be > 0, got {args.adv_learning_rate}.")


def class_stats_paths(given, stats_paths, flag: str) -> list:
    """Per-class statistics file of each encoder: ``given`` (one per stats file), else the
    ``<stats>.classes.safetensors`` next to each stats file where there is one (None where not)."""
    from fd_onestep.dataset_stats import CLASS_STATS_SUFFIX

    given = parse_name_list(given)
    if given:
        if len(given) != len(stats_paths):
            raise ValueError(f"{flag} has {len(given)} files for {len(stats_paths)} encoders; pass one per encoder.")
        for path in given:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{flag} file {path!r} does not exist; compute it with `fd-onestep stats "
                                        "--label_column label ...` (it writes <encoder>.classes.safetensors).")
        return list(given)
    found = []
    for stats in stats_paths:
        path = Path(stats)
        candidate = path.with_name(path.with_suffix("").name + CLASS_STATS_SUFFIX)
        found.append(str(candidate) if candidate.is_file() else None)
    return found


def explicit_args(input_args=None) -> set[str]:
    """The arguments given on the command line (``input_args``, else ``sys.argv``): a preset never overrides them."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # an argument not given leaves no attribute
    return set(vars(parser.parse_args(input_args)))


def fill_not_given(args, values: dict, given: set[str]) -> None:
    """Set ``values`` (a recipe or a preset) on ``args`` except for arguments in ``given`` (and their tied ones)."""
    for key, value in values.items():
        if key not in given and TIED_ARGS.get(key) not in given:
            setattr(args, key, list(value) if isinstance(value, list) else value)


def apply_preset(args, given: set[str]) -> None:
    """``--preset``: its values for the arguments not in ``given``; only on top of a digits default (its values
    are made for the bundled digits teachers and are still under study, docs/quality.md)."""
    if args.preset is None:
        return
    if not args.embedded_default:
        raise ValueError(f"--preset {args.preset} is a recipe of the offline digits defaults (its values were made "
                         "for them): drop it, or drop --pretrained_model_name_or_path / --encoders / "
                         "--reference_stats to run it on the digits default.")
    fill_not_given(args, PRESETS[args.preset], given)


def parse_args(input_args=None) -> argparse.Namespace:
    args = build_parser().parse_args(input_args)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    return finalize_args(args, explicit_args(input_args))


# --------------------------------------------------------------------------------------------------------
# Inputs: prompts, class histogram, reference statistics
def load_prompts(args) -> list[str] | None:
    if args.prompts_file is not None:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts_file {args.prompts_file!r} has no prompts; write one prompt per line.")
        return prompts[: args.max_prompts] if args.max_prompts else prompts
    if args.dataset_name is not None:
        dataset = load_caption_dataset(args)
        if args.caption_column not in dataset.column_names:
            raise ValueError(
                f"--caption_column {args.caption_column!r} is not a column of {args.dataset_name} "
                f"({dataset.column_names}); pass the caption column's name."
            )
        if args.max_prompts:
            dataset = dataset.select(range(min(args.max_prompts, len(dataset))))
        prompts = []
        for caption in dataset[args.caption_column]:
            if isinstance(caption, (list, tuple)):
                prompts.extend(str(c) for c in caption if str(c).strip())
            elif caption is not None and str(caption).strip():
                prompts.append(str(caption))
        if not prompts:
            raise ValueError(f"no captions in column {args.caption_column!r} of {args.dataset_name}.")
        return prompts
    return None


def load_caption_dataset(args):
    """``--dataset_name``'s split (``datasets.load_dataset``; cached after the first call)."""
    import datasets

    return datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split,
                                 cache_dir=args.cache_dir)


def load_class_histogram(args, references) -> list[float] | None:
    if args.class_label_distribution == "uniform":
        return None
    if args.class_histogram is not None:
        hist = json.loads(Path(args.class_histogram).read_text())
        if isinstance(hist, dict):
            hist = hist.get("counts", hist.get("class_histogram"))
        return [float(h) for h in hist]
    for ref in references.values():
        raw = (ref.metadata or {}).get("class_histogram")
        if raw:
            return [float(h) for h in (json.loads(raw) if isinstance(raw, str) else raw)]
    raise ValueError(
        "--class_label_distribution reference: no label histogram found (none of the reference stats has "
        "'class_histogram' metadata); pass --class_histogram FILE (JSON list of per-class counts) or use uniform."
    )


def load_reference(path: str, encoder_id: str):
    from fd_onestep.reference_stats import ReferenceStats

    if str(path).endswith(".npz"):
        return ReferenceStats.from_npz(path, encoder_id=encoder_id)
    return ReferenceStats.load(path)


# --------------------------------------------------------------------------------------------------------
# Building the run: accelerator, early checks, one-step pipeline, encoders, generator, loss, optimizer
def build_accelerator(args):
    """Accelerator + logging, the diffusers-examples way."""
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        # `accelerate launch --multi_gpu --num_processes N` on a machine without CUDA: N CPU processes (gloo).
        cpu=not torch.cuda.is_available(),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info() if os.environ.get("FD_ONESTEP_VERBOSE") else None
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    logger.info(accelerator.state, main_process_only=False)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(args, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))))
        logger.info(f"CPU run: {torch.get_num_threads()} torch threads per process")
    return accelerator


def cpu_threads(args, num_local_processes: int) -> int:
    """Torch threads per process of a CPU run: ``--num_cpu_threads``, else this process's cores shared evenly."""
    if args.num_cpu_threads:
        return args.num_cpu_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, num_local_processes))


def teacher_config_file(args, filename: str) -> dict | None:
    """A JSON config file of the teacher (``model_index.json``, ``vae/config.json``...), read without any weights:
    from its folder, or from the Hub or its cache; None where it cannot be read (the loading then says why)."""
    root = Path(args.pretrained_model_name_or_path)
    try:
        if root.is_dir():
            path = root / filename
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(args.pretrained_model_name_or_path, filename, revision=args.revision,
                                        cache_dir=args.cache_dir, local_files_only=args.local_files_only))
        return json.loads(path.read_text()) if path.is_file() else None
    except Exception:  # offline, not on the Hub, not JSON: from_teacher gives the precise error later
        return None


def check_inputs(args) -> None:
    """Everything about the inputs that needs no model, before any loads: encoder names, statistics files (finite,
    made with the named encoder), prompts, the resolution against the VAE, LoRA targets and rank against the
    denoiser's module names (the denoiser built from its config on the meta device: no weights, no memory).
    Raises ValueError naming the argument and the fix; warns about a LoRA rank above the targeted layers' width."""
    from fd_onestep.encoders import check_encoder_name, expected_encoder_id

    for flag, names in (("--encoders", args.encoders), ("--eval_encoders", args.eval_encoders)):
        for name in names:
            try:
                check_encoder_name(name)
            except ValueError as err:
                raise ValueError(f"{flag}: {err}") from None
    for name, path in [*zip(args.encoders, args.reference_stats), *zip(args.eval_encoders, args.eval_reference_stats)]:
        full_id, model = expected_encoder_id(name)
        ref = load_reference(path, full_id)
        if not (torch.isfinite(ref.mu).all() and torch.isfinite(ref.sigma).all()):
            raise ValueError(f"reference statistics {path!r} hold NaN or infinite values; recompute them with "
                             "`fd-onestep stats` (with --skip_unreadable_images if some images are damaged).")
        made_with = ref.encoder_id
        parts = (made_with or "").split(":")
        if made_with and ((full_id and made_with != full_id) or (model and (len(parts) < 4 or parts[1] != model))):
            raise ValueError(
                f"--encoders {name!r} with reference stats {path!r}: the statistics were computed with encoder "
                f"{made_with!r}, not {full_id or model!r}. Pass each encoder's own statistics, in the order of "
                f"--encoders, or compute them: `fd-onestep stats --encoders {name} ...`."
            )
    if args.prompts_file is not None and not any(
            line.strip() for line in Path(args.prompts_file).read_text().splitlines()):
        raise ValueError(f"--prompts_file {args.prompts_file!r} has no prompts; write one prompt per line.")
    index = teacher_config_file(args, "model_index.json")
    if index is None:
        return
    text_model = "text_encoder" in index or "text_encoder_2" in index
    if text_model and not args.embedded_default and args.prompts_file is None and args.dataset_name is None:
        raise ValueError(
            f"{args.pretrained_model_name_or_path} is a text-to-image model ({index.get('_class_name')}): pass "
            "training prompts with --prompts_file FILE or --dataset_name NAME --caption_column COLUMN."
        )
    if not text_model and (args.prompts_file or args.dataset_name):
        raise ValueError(f"{args.pretrained_model_name_or_path} is not a text model: drop --prompts_file/--dataset_name.")
    vae = teacher_config_file(args, "vae/config.json") if "vae" in index else None
    # the downsampling factor as the family adapters compute it (AutoencoderKL; SANA's AutoencoderDC)
    blocks = (vae or {}).get("block_out_channels") or (vae or {}).get("encoder_block_out_channels")
    if args.resolution is not None and blocks:
        factor = 2 ** (len(blocks) - 1)
        if args.resolution % factor:
            raise ValueError(
                f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {factor}; "
                f"use a multiple of {factor}."
            )
    if args.use_lora:
        check_lora_targets(args, index)


def check_lora_targets(args, index: dict) -> None:
    """``--lora_target_modules`` against the denoiser's module names, and ``--lora_rank`` against the targeted
    layers' widths, on the denoiser built from its config on the meta device (PEFT's suffix matching)."""
    import diffusers
    from accelerate import init_empty_weights

    from fd_onestep.pipelines.pipeline_fd_onestep import DEFAULT_LORA_TARGETS, family_of_denoiser

    component = next((c for c in ("unet", "transformer") if c in index), None)
    config = teacher_config_file(args, f"{component}/config.json") if component else None
    model_class = getattr(diffusers, str((index.get(component) or [None, None])[1]), None) if component else None
    if config is None or model_class is None:
        return
    try:
        with init_empty_weights():
            denoiser = model_class.from_config(config)
        family = family_of_denoiser(denoiser)
    except Exception:  # not a supported denoiser: from_teacher's own error is the clear one
        return
    targets = args.lora_target_modules or DEFAULT_LORA_TARGETS[family]
    modules = dict(denoiser.named_modules())
    matched = {t: [n for n in modules if n == t or n.endswith("." + t)] for t in targets}
    unmatched = [t for t, names in matched.items() if not names]
    if unmatched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                           if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))})
        raise ValueError(
            f"--lora_target_modules {unmatched} match no module of the teacher's {component} ({model_class.__name__}). "
            f"Its linear and convolution layers end in: {', '.join(suffixes[:30])}; pass some of those "
            f"(default for {family}: {' '.join(DEFAULT_LORA_TARGETS[family])})."
        )
    widths = {n: min(getattr(m, "in_features", 0) or m.in_channels, getattr(m, "out_features", 0) or m.out_channels)
              for names in matched.values() for n in names
              if isinstance(modules[n], (torch.nn.Linear, torch.nn.Conv2d)) for m in [modules[n]]}
    narrow = {n: w for n, w in widths.items() if w < args.lora_rank}
    if narrow:
        name, width = min(narrow.items(), key=lambda item: item[1])
        logger.warning(
            f"--lora_rank {args.lora_rank} exceeds the width of {len(narrow)} of the {len(widths)} targeted layers "
            f"(e.g. {name}: {width}): a LoRA of rank r on a layer of width w < r is still rank w, and only costs "
            f"memory and time. Lower --lora_rank to at most {max(widths.values())} (the widest targeted layer)."
        )


def check_run_setup(args, accelerator):
    """Everything that can fail before a model is loaded: Hub credentials, resume target, output dir.

    Returns ``(fingerprint, resume_path, hub_repo_id, hub_token)``; writes the run's arguments.
    """
    output_dir = Path(args.output_dir)
    hub_repo_id = hub_token = None
    if args.push_to_hub:
        hub_repo_id, hub_token = check_push_to_hub(args.hub_token, args.hub_model_id, output_dir)
    elif args.hub_token:
        logger.warning("--hub_token is ignored without --push_to_hub (and is never saved or logged).")
    # the caption dataset by its content: datasets' own fingerprint of the loaded split
    dataset_fingerprint = load_caption_dataset(args)._fingerprint if args.dataset_name is not None else None
    fingerprint = run_fingerprint(args, accelerator.num_processes, dataset_fingerprint)
    resume_path = resolve_resume_checkpoint(args.resume_from_checkpoint, output_dir)
    # The main process alone takes the folder (lock; overwrite refusal or clean-up); every process learns the outcome.
    lock, refusal = OutputDirLock(output_dir), None
    if accelerator.is_main_process:
        try:
            if not args.overwrite_output_dir:
                # another run's checkpoints: say which arguments differ before refusing to write over them
                check_output_dir_compatible(output_dir, fingerprint)
            check_no_overwrite(output_dir, resuming=resume_path is not None, overwrite=args.overwrite_output_dir)
            lock.acquire()
            if args.overwrite_output_dir:
                clear_previous_run(output_dir, [RUN_ARGS_FILE])
        except (RunError, ValueError) as err:
            refusal = err
    raise_if_main_refused(accelerator, refusal)
    if resume_path is not None:
        check_checkpoint_compatible(resume_path, fingerprint)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_run_args(output_dir, args, fingerprint)
    accelerator.wait_for_everyone()
    return fingerprint, resume_path, hub_repo_id, hub_token, lock


def raise_if_main_refused(accelerator, refusal: Exception | None) -> None:
    """Raise ``refusal`` on the main process and a :class:`RunError` on the others (which print nothing: the
    main process says why). One broadcast of a flag on the process's device."""
    from accelerate.utils import broadcast

    flag = torch.tensor([0 if refusal is None else 1], dtype=torch.int32, device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = broadcast(flag, from_process=0)
    if refusal is not None:
        raise refusal
    if int(flag.item()):
        raise RunError("the main process refused this run (its message says why).")


def teacher_load_kwargs(args) -> dict:
    """``from_pretrained`` keywords of the teacher: revision, variant, cache dir, local-files-only."""
    kwargs = {k: getattr(args, k) for k in ("revision", "variant", "cache_dir") if getattr(args, k) is not None}
    if args.local_files_only:
        kwargs["local_files_only"] = True
    return kwargs


def build_one_step_pipeline(args):
    """The teacher as an :class:`FDOneStepPipeline` with the run's one-step settings."""
    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

    pipe = FDOneStepPipeline.from_teacher(
        args.pretrained_model_name_or_path,
        timestep=args.onestep_timestep,
        prediction_type=args.prediction_type,
        guidance_scale=args.guidance_scale,
        output_bound=args.output_bound,
        **({"null_class_label": args.null_class_label} if args.null_class_label is not None else {}),
        **({"max_sequence_length": args.max_sequence_length} if args.max_sequence_length is not None else {}),
        **teacher_load_kwargs(args),
    )
    if args.resolution is not None:
        factor = pipe.vae_scale_factor if pipe.is_latent else 1
        if args.resolution % factor:
            raise ValueError(
                f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {factor}; "
                f"use a multiple of {factor}."
            )
        pipe.register_to_config(sample_size=args.resolution // factor)
    return pipe


class Representations:
    """The encoders of the loss and the eval-only ones, each with its reference statistics (by short name), and
    the per-class statistics (``ClassConditionalStats``) of those that have them."""

    def __init__(self, encoders: dict, references: dict, eval_encoders: dict, eval_references: dict,
                 class_references: dict | None = None):
        self.encoders, self.references = encoders, references
        self.eval_encoders, self.eval_references = eval_encoders, eval_references
        self.class_references = dict(class_references or {})
        self.classifier = None  # images -> predicted labels (--classifier), for adherence
        self.classifier_model = None  # its (model, image_processor), which the comparison's class histogram needs

    @property
    def all_encoders(self) -> dict:
        return {**self.encoders, **self.eval_encoders}

    @property
    def all_references(self) -> dict:
        return {**self.references, **self.eval_references}


def build_encoders(args, names, stats_paths, device, class_stats_paths=()):
    """{label: FeatureEncoder}, {label: ReferenceStats}, {label: ClassConditionalStats}; stats checked against
    their encoder first."""
    from fd_onestep.conditioning_metrics import ClassConditionalStats
    from fd_onestep.encoders import INCEPTION_NAMES, load_encoder

    encoder_autocast = None if args.encoder_autocast == "no" else args.encoder_autocast
    aliases = label_aliases(args)
    encoders, references, class_references = {}, {}, {}
    class_stats_paths = list(class_stats_paths) or [None] * len(names)
    for name, path, class_path in zip(names, stats_paths, class_stats_paths):
        is_inception = name.strip().lower() in INCEPTION_NAMES
        enc = load_encoder(name, device=device, autocast_dtype=encoder_autocast,
                           gradient_checkpointing=args.encoder_gradient_checkpointing,
                           local_files_only=True if args.local_files_only else None,
                           cache_dir=None if is_inception else args.cache_dir,
                           weights_path=args.inception_weights if is_inception else None)
        enc.requires_grad_(False)
        enc.eval()
        ref = load_reference(path, enc.encoder_id)
        try:
            ref.check_compatible(enc.encoder_id, enc.feature_dim)
        except ValueError as err:
            raise ValueError(f"--encoders {name!r} with reference stats {path!r}: {err}") from None
        label = encoder_label(name, aliases)
        encoders[label], references[label] = enc, ref
        if class_path is not None:
            class_ref = ClassConditionalStats.load(class_path)
            try:
                class_ref.check_compatible(enc.encoder_id, enc.feature_dim)
            except ValueError as err:
                raise ValueError(f"--encoders {name!r} with per-class stats {class_path!r}: {err}") from None
            class_references[label] = class_ref
    return encoders, references, class_references


def build_representations(args, device) -> Representations:
    encoders, references, class_refs = build_encoders(args, args.encoders, args.reference_stats, device,
                                                      args.class_reference_stats)
    eval_encoders, eval_references, eval_class_refs = build_encoders(
        args, args.eval_encoders, args.eval_reference_stats, device, args.eval_class_reference_stats)
    reps = Representations(encoders, references, eval_encoders, eval_references, {**class_refs, **eval_class_refs})
    if args.classifier:
        from fd_onestep.classifiers import label_predictor, load_image_classifier

        source = args.classifier
        if source == "digits":  # the digits demo's bundled classifier, by name
            from fd_onestep.demos import digits

            source = digits.classifier_path()
        reps.classifier_model = load_image_classifier(source, device=device, local_files_only=True)
        reps.classifier = label_predictor(reps.classifier_model)
    return reps


def load_conditioning(args, pipe, reps: Representations):
    """Training prompts (text models) with the class each names where known (the digits-text default), and the
    class-label histogram (class-conditional models), checked. Returns ``(prompts, prompt_labels, histogram)``."""
    prompts = prompt_labels = None
    if args.embedded_default == "digits-text":
        from fd_onestep.demos import digits

        pairs = [(digits.digit_prompt(c, phrasing), c) for c in range(digits.NUM_CLASSES)
                 for phrasing in digits.TRAINING_PHRASINGS]
        prompts, prompt_labels = [p for p, _ in pairs], [c for _, c in pairs]
    elif pipe.is_text_conditional:
        prompts = load_prompts(args)
    labeled = pipe.is_class_conditional or prompt_labels is not None
    if pipe.is_text_conditional and prompts is None:
        raise ValueError(
            f"{args.pretrained_model_name_or_path} is a text-to-image model ({pipe.family}): pass training prompts "
            "with --prompts_file FILE or --dataset_name NAME --caption_column COLUMN."
        )
    if not pipe.is_text_conditional and (args.prompts_file or args.dataset_name):
        raise ValueError(f"{args.pretrained_model_name_or_path} is not a text model: drop --prompts_file/--dataset_name.")
    class_histogram = load_class_histogram(args, reps.references) if pipe.is_class_conditional else None
    if not pipe.is_class_conditional and args.class_label_distribution != "uniform":
        raise ValueError("--class_label_distribution reference needs a class-conditional model.")
    if not labeled and (args.fd_condition == "joint" or args.classifier):
        raise ValueError(f"{args.pretrained_model_name_or_path} is not class-conditional: --fd_condition joint and "
                         "--classifier measure class labels; drop them.")
    if args.compare_with_teacher and pipe.is_latent and args.embedded_default != "digits-text":
        raise ValueError(
            f"--compare_with_teacher supports pixel (UNet2DModel) teachers, unconditional or class-conditional; this "
            f"is a {pipe.family!r} model. Drop --compare_with_teacher (or pass --no-compare_with_teacher) and "
            "evaluate with `fd-onestep evaluate`."
        )
    from fd_onestep.onestep import num_label_classes

    num_classes = num_label_classes(pipe, prompt_labels)
    if labeled:
        for name, class_ref in reps.class_references.items():
            if class_ref.num_classes != num_classes:
                raise ValueError(
                    f"the per-class stats of {name} have {class_ref.num_classes} classes, the model {num_classes}"
                    + (" (its null class excluded)" if pipe.config.null_class_label is not None else "")
                    + "; pass statistics of the model's label set (and --null_class_label if it has a null class)."
                )
    return prompts, prompt_labels, class_histogram


def weight_dtype_of(accelerator) -> torch.dtype | None:
    """The frozen modules' dtype under ``--mixed_precision`` (diffusers' examples' ``weight_dtype``); None: no cast."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)


def build_decode_savers(args, pipe):
    """``--decode_micro_batch_size`` and ``--surrogate_decoder`` as a ``DecodeSavers`` (docs/memory_savers.md)."""
    from fd_onestep.memory_savers import DecodeSavers, check_surrogate_fits, load_surrogate_decoder

    wanted = [f for f in ("vae_gradient_checkpointing", "decode_micro_batch_size", "surrogate_decoder") if getattr(args, f)]
    if wanted and not pipe.is_latent:
        raise ValueError(f"--{', --'.join(wanted)} apply to the VAE decode of a latent model; this teacher generates "
                         "pixels: drop them.")
    surrogate = None
    if args.surrogate_decoder:
        surrogate = load_surrogate_decoder(args.surrogate_decoder, **{k: v for k, v in teacher_load_kwargs(args).items()
                                                                     if k in ("cache_dir", "local_files_only")})
        check_surrogate_fits(surrogate, pipe.vae)
    return DecodeSavers(micro_batch_size=args.decode_micro_batch_size, surrogate=surrogate)


def build_generator(args, pipe, reps: Representations, prompts, prompt_labels, class_histogram, device,
                    weight_dtype=None):
    """The trainable one-step generator (full denoiser or a LoRA on it). Returns ``(gen, trainable params)``.

    Under mixed precision (``weight_dtype``) the frozen VAE / text encoders and a LoRA's base weights are cast
    to the weight dtype and the LoRA parameters kept in float32 (``OneStepGenerator.add_lora``), as diffusers'
    examples do; a full fine-tune keeps its float32 weights.
    """
    from fd_onestep.onestep import OneStepGenerator

    if args.debug_float64:
        weight_dtype = None  # float64 everywhere: nothing is cast down
        for module in [pipe.denoiser, *(getattr(pipe, n) for n in pipe.frozen_component_names),
                       *reps.all_encoders.values()]:
            module.to(torch.float64)
    gen = OneStepGenerator(pipe, prompts=prompts, prompt_labels=prompt_labels, class_histogram=class_histogram, device=device,
                           weight_dtype=weight_dtype, decode_savers=build_decode_savers(args, pipe))
    if args.vae_gradient_checkpointing:
        if not getattr(pipe.vae, "_supports_gradient_checkpointing", False):
            raise ValueError(f"--vae_gradient_checkpointing: {type(pipe.vae).__name__} has no gradient checkpointing in "
                             "diffusers; use --decode_micro_batch_size instead.")
        pipe.vae.enable_gradient_checkpointing()
    denoiser = gen.denoiser
    if args.use_lora:
        try:
            gen.add_lora(rank=args.lora_rank, alpha=args.lora_alpha, target_modules=args.lora_target_modules)
        except ValueError as err:  # PEFT's, for targets check_inputs could not check (a config it could not read)
            raise ValueError(f"--lora_target_modules {args.lora_target_modules or '(the family default)'}: {err} "
                             "Pass module-name suffixes of the denoiser's linear / convolution layers.") from None
    else:
        denoiser.requires_grad_(True)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if args.channels_last:
        denoiser.to(memory_format=torch.channels_last)  # only 4-D (convolution) weights change layout
    denoiser.train()
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters (check --lora_target_modules: it matched no module).")
    return gen, trainable


def loss_label_embedding(args, class_ref):
    """The joint FD-loss's ``LabelEmbedding`` for an encoder's per-class statistics: alpha = ``--fd_label_scale``
    times their trace-matching scale."""
    from fd_onestep.conditioning_metrics import LabelEmbedding

    return LabelEmbedding(class_ref.num_classes, args.fd_label_scale * class_ref.alpha)


def build_fd_loss(args, reps: Representations, device):
    """``MultiEncoderFDLoss`` over the training encoders, one population of ``--fd_population`` each, created on
    ``device`` (the process's: NCCL reduces CUDA tensors only)."""
    from fd_onestep.losses import FDLoss, MultiEncoderFDLoss
    from fd_onestep.populations import build_population

    population_kwargs = {"ema": {"beta": args.fd_ema_beta}, "queue": {"queue_size": args.fd_queue_size},
                         "exact": {"micro_batches": args.fd_micro_batches}}[args.fd_population]
    fd_losses = {}
    for name, enc in reps.encoders.items():
        if args.fd_condition == "joint":
            # [features, alpha * one_hot(label)] against the joint reference at the same alpha
            class_ref = reps.class_references[name]
            embedding = loss_label_embedding(args, class_ref)
            reference, dim = class_ref.joint_reference_at(embedding.alpha), enc.feature_dim + embedding.num_classes
        else:
            embedding, reference, dim = None, reps.references[name], enc.feature_dim
        population = build_population(args.fd_population, dim, device=device, **population_kwargs)
        fd_losses[name] = FDLoss(reference, population, label_embedding=embedding)
    weights = dict(zip(reps.encoders, args.encoder_loss_weights))
    return MultiEncoderFDLoss(fd_losses, weights=weights, **({} if args.fd_eps is None else {"eps": args.fd_eps}))


def build_discriminator(args, gen, reps: Representations, device):
    """``--adv_weight > 0``: the discriminator head (float32, on ``device``) on ``--adv_encoder``'s features, with
    the real images' features computed once (the digits train split for the offline defaults); else None."""
    if not args.adv_weight:
        return None
    from fd_onestep.adversarial import FeatureDiscriminator

    encoder = reps.encoders[args.adv_encoder]
    if args.adv_real_images is not None:
        from fd_onestep.dataset_stats import iter_folder_batches

        batches, _ = iter_folder_batches(args.adv_real_images, batch_size=args.sample_batch_size,
                                         resolution=gen.image_shape[-1], max_samples=args.adv_max_real_images)
    else:
        from fd_onestep.demos import digits

        images = digits.load_digits_split("train")[0][: args.adv_max_real_images]
        batches = images.split(args.sample_batch_size)
    features = []
    with torch.inference_mode():
        for images in batches:
            features.append(encoder(images.to(device).clamp(-1, 1)).float().cpu())
    features = torch.cat(features)
    logger.info(f"Adversarial term: {args.adv_loss} loss, weight {args.adv_weight}, head on {args.adv_encoder} "
                f"features, {features.shape[0]} real images")
    return FeatureDiscriminator(encoder.feature_dim, features, hidden=args.adv_hidden, kind=args.adv_loss,
                                learning_rate=args.adv_learning_rate, device=device, seed=args.seed)


def build_optimizer(args, trainable, accelerator):
    """AdamW, the lr schedule and (``--use_ema``) the generator-weights EMA."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    world = accelerator.num_processes
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * world
    optimizer = torch.optim.AdamW(
        trainable, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
        **({"fused": True} if args.adam_fused else {}),  # else torch's own default (foreach where it can)
    )
    # AcceleratedScheduler steps once per process per optimizer step: scale so the schedule is world-size free.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * world, num_training_steps=args.max_train_steps * world,
        num_cycles=args.lr_num_cycles, power=args.lr_power,
    )
    ema = None
    if args.use_ema:
        ema = EMAModel(trainable, decay=args.ema_decay, update_after_step=args.ema_update_after_step,
                       use_ema_warmup=args.ema_use_warmup, inv_gamma=args.ema_inv_gamma, power=args.ema_power)
        ema.to(accelerator.device)
    return optimizer, lr_scheduler, ema


def unwrap(accelerator, model):
    """The plain module under DDP / torch.compile wrappers."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


# --------------------------------------------------------------------------------------------------------
# Checkpoints: everything as safetensors (+ JSON), through accelerate's save/load state hooks
def register_checkpoint_hooks(accelerator, args, gen, fd_loss, ema, sampling_rng, progress, fingerprint,
                              discriminator=None):
    slot = gen.pipeline.denoiser_slot

    def save_model_hook(models, weights, ckpt_dir):
        if accelerator.is_main_process:
            ckpt_dir = Path(ckpt_dir)
            for model in models:
                model = unwrap(accelerator, model)
                if args.use_lora:
                    gen.save_lora(ckpt_dir / f"{slot}_lora", denoiser=model)
                else:
                    model.save_pretrained(ckpt_dir / slot)
            save_state_file({name: loss.population.state_dict() for name, loss in fd_loss.losses.items()},
                            ckpt_dir / "fd_populations.safetensors")
            if ema is not None:
                save_state_file(ema.state_dict(), ckpt_dir / "generator_ema.safetensors")
            if discriminator is not None:
                save_state_file(discriminator.training_state(), ckpt_dir / "discriminator.safetensors")
            save_state_file({"sampling_rng": sampling_rng.state_dict(), "progress": progress.state_dict()},
                            ckpt_dir / "training_state.safetensors")
            write_run_args(ckpt_dir, args, fingerprint)
        while weights:
            weights.pop()  # the denoiser is saved above in diffusers format, not as model.safetensors

    def load_model_hook(models, ckpt_dir):
        ckpt_dir = Path(ckpt_dir)
        while models:
            model = unwrap(accelerator, models.pop())
            if args.use_lora:
                from peft import set_peft_model_state_dict
                from safetensors.torch import load_file

                lora_file = ckpt_dir / f"{slot}_lora" / "pytorch_lora_weights.safetensors"
                saved = load_file(str(lora_file))
                state = {k[len(slot) + 1:]: v for k, v in saved.items() if k.startswith(slot + ".")}
                if not state:
                    prefixes = sorted({k.split(".", 1)[0] for k in saved})
                    raise RuntimeError(
                        f"checkpoint LoRA {lora_file} holds no weights for the {slot!r} component (its keys start "
                        f"with {prefixes}): it belongs to another model. Resume from a checkpoint of this run, or "
                        "start a new run in a fresh --output_dir."
                    )
                result = set_peft_model_state_dict(model, state, adapter_name="default")
                unexpected = [k for k in (getattr(result, "unexpected_keys", None) or []) if "lora_" in k]
                missing = [k for k in (getattr(result, "missing_keys", None) or []) if "lora_" in k]
                if unexpected or missing:
                    raise RuntimeError(
                        f"checkpoint LoRA {lora_file} does not match the model's LoRA: "
                        + (f"unexpected keys {unexpected[:5]} " if unexpected else "")
                        + (f"missing keys {missing[:5]} ({len(missing)} in all) " if missing else "")
                        + "(another --lora_rank / --lora_target_modules, or a damaged checkpoint). Resume with the "
                        "run's own arguments and checkpoint, or start a new run in a fresh --output_dir."
                    )
            else:
                loaded = type(model).from_pretrained(ckpt_dir / slot)
                model.load_state_dict(loaded.state_dict())
                del loaded
        pop_states = load_state_file(ckpt_dir / "fd_populations.safetensors")
        for name, loss in fd_loss.losses.items():
            loss.population.load_state_dict(pop_states[name])
        if ema is not None:
            ema.load_state_dict(load_state_file(ckpt_dir / "generator_ema.safetensors"))
            ema.to(accelerator.device)
        if discriminator is not None:
            discriminator.load_training_state(load_state_file(ckpt_dir / "discriminator.safetensors"))
        state = load_state_file(ckpt_dir / "training_state.safetensors")
        sampling_rng.load_state_dict(state["sampling_rng"])
        progress.load_state_dict(state["progress"])

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


class StopRequest:
    """SIGTERM / SIGINT (preemption, a scheduler's time limit, Ctrl-C): finish the current step, checkpoint, stop.

    The handlers only note the signal; :meth:`agreed` is checked after every step and tells all processes
    at once (a sum over processes of a flag on the process's device), so they stop after the same step. A
    second Ctrl-C stops at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}
        return self

    def _note(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logger.warning(f"{self.received} received: finishing this step, then writing a checkpoint and stopping "
                       "(Ctrl-C again to stop at once).", main_process_only=False)

    def agreed(self, accelerator) -> bool:
        """Whether any process received a stop signal (a collective: every process calls it after each step)."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32, device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return int(flag.item()) > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def load_checkpoint(accelerator, path) -> None:
    """``accelerator.load_state``; a file that cannot be read is a :class:`RunError` naming the checkpoint."""
    import pickle

    from safetensors import SafetensorError

    try:
        accelerator.load_state(str(path))
    except RunError:
        raise
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError) as err:
        raise RunError(
            f"could not load checkpoint {str(path)!r} ({type(err).__name__}: {err}): a damaged checkpoint. Resume "
            "from another one (--resume_from_checkpoint checkpoint-<step>, or 'latest' after deleting this one)."
        ) from err


def save_checkpoint(accelerator, args, step, fingerprint):
    path = save_checkpoint_atomically(accelerator, args.output_dir, step,
                                      {"fingerprint_digest": fingerprint_digest(fingerprint)})
    if accelerator.is_main_process:
        honour_umask(path)
        prune_checkpoints(args.output_dir, args.checkpoints_total_limit, protect=[path])
    logger.info(f"Saved state to {path}")


# --------------------------------------------------------------------------------------------------------
# Generation and features
def draw_local_batch(accelerator, gen, global_n: int, rng: torch.Generator, first_index: int | None = None):
    """The global batch's noise + conditioning, drawn identically on every process; this process's rows.

    ``first_index``: class-conditional models get the balanced labels ``(first_index + i) % num_classes`` of the
    global rows (validation, samples: every class equally often) instead of drawn ones (same noise either way).
    Returns ``(noise, conditioning or None, index of the first local row in the global batch)``.
    """
    device = accelerator.device
    noise = gen.sample_noise(global_n, generator=rng, device=device)
    cond = gen.sample_conditioning(global_n, generator=rng, device=device)
    if first_index is not None and gen.labeled:
        labels = (torch.arange(global_n) + first_index) % gen.num_label_classes
        cond = gen.conditioning_for_labels(labels, generator=rng, device=device)
    with accelerator.split_between_processes(list(range(global_n))) as rows:
        start, end = (rows[0], rows[-1] + 1) if rows else (global_n, global_n)
    return noise[start:end], (cond[start:end] if cond is not None else None), start


def generate_images(accelerator, gen, model, noise, cond) -> torch.Tensor:
    """The generator's images (B, C, H, W) float32, under the run's mixed-precision autocast.

    The encoders run outside it, in their own precision (``--encoder_autocast``), in every pass: the exact
    population's two passes and validation then describe the same samples with the same features.
    """
    with accelerator.autocast():
        return gen(model, noise, cond).float()


def encode(images, encoders) -> dict:
    # Clamped as saving the images would: the encoders measure exactly what a user gets (a no-op under
    # --output_bound tanh/clamp; unbounded outputs lose the gradient of their out-of-range pixels only).
    images = images.clamp(-1.0, 1.0)
    return {name: enc(images) for name, enc in encoders.items()}


@contextlib.contextmanager
def ema_weights(ema, trainable):
    """The generator-EMA weights swapped in (``--use_ema``): validation, samples and saved weights use them."""
    if ema is None:
        yield
        return
    ema.store(trainable)
    ema.copy_to(trainable)
    try:
        yield
    finally:
        ema.restore(trainable)


def class_labels_of(cond) -> torch.Tensor | None:
    """The (B,) int64 class labels of a batch's conditioning, or None (unconditional, text)."""
    return getattr(cond, "class_labels", None)


def stream_features(accelerator, gen, model, total: int, seed: int, encoders, batch_size: int, on_images=None,
                    balanced: bool = False):
    """Yield per-chunk ``(feature dict, class labels or None)`` of ``total`` fresh no-grad samples (global count,
    split over processes).

    ``on_images(images, first_global_index, labels)`` sees each local chunk of images; a process with no rows
    in a chunk yields ``(None, None)`` (every process yields once per chunk, so collectives stay in step).
    ``balanced``: class-conditional models get every class equally often (:func:`draw_local_batch`).
    """
    rng = torch.Generator().manual_seed(seed)
    done = 0
    while done < total:
        n = min(batch_size * accelerator.num_processes, total - done)
        noise, cond, start = draw_local_batch(accelerator, gen, n, rng, first_index=done if balanced else None)
        features, labels = None, class_labels_of(cond)
        # inference mode: no autograd bookkeeping in the generator or the encoders (the yielded tensors are
        # only read afterwards: moments, warm starts, PNGs)
        with torch.inference_mode():
            if noise.shape[0]:
                images = generate_images(accelerator, gen, model, noise, cond)
                if on_images is not None:
                    on_images(images, done + start, labels)
                features = encode(images, encoders)
        yield features, (labels if features is not None else None)
        done += n


def fresh_sample_fds(args, accelerator, gen, model, reps: Representations, total: int, seed: int,
                     batch_size: int) -> tuple[dict, float | None]:
    """FD of ``total`` fresh samples vs the references, in every training and eval encoder.

    Class-conditional models (balanced labels with uniform label sampling): also per-class FD and FJD where
    per-class statistics exist, the joint FD at the loss's own alpha (``loss_fd``, what the joint loss's
    population FD estimates) and adherence with ``--classifier``.
    Returns ``({name: {...}}, adherence or None)``.
    """
    from fd_onestep.conditioning_metrics import (
        AdherenceCounter,
        ClassConditionalMoments,
        frechet_joint_distance,
        joint_moments,
        per_class_frechet_distances,
    )
    from fd_onestep.moments import FeatureMoments

    device = accelerator.device
    all_references = reps.all_references
    moments = {name: FeatureMoments(enc.feature_dim, device=device) for name, enc in reps.all_encoders.items()}
    conditional = gen.labeled
    class_moments = {name: ClassConditionalMoments(reps.all_encoders[name].feature_dim, ref.num_classes, device=device)
                     for name, ref in reps.class_references.items()} if conditional else {}
    counter = AdherenceCounter() if conditional and reps.classifier is not None else None

    def classify(images, start, labels):
        counter.update(reps.classifier(images), labels)

    balanced = conditional and args.class_label_distribution == "uniform"
    for feats, labels in stream_features(accelerator, gen, model, total, seed, reps.all_encoders, batch_size,
                                         on_images=classify if counter is not None else None, balanced=balanced):
        if feats is not None:
            for name, f in feats.items():
                moments[name].update(f)
                if name in class_moments:
                    class_moments[name].update(f, labels)
    out = {}
    for name, m in moments.items():
        m.all_reduce()
        fd = float(all_references[name].frechet_distance(m.mean, m.covariance()))
        vfd = all_references[name].validation_fd
        out[name] = {"fresh_fd": fd, "fd_r": (fd / vfd) if vfd else None, "in_loss": name in reps.encoders}
    for cm in class_moments.values():
        cm.all_reduce()
    counts = next(iter(class_moments.values())).class_counts if class_moments else None
    if counts is not None and int(counts[counts > 0].min()) < 2:
        # too few samples of some requested class for its covariance: no per-class measures this time
        logger.warning(f"per-class FD and FJD skipped: {int((counts == 1).sum())} class(es) got a single one of the "
                       f"{total} validation samples; raise --num_validation_samples (>= 2 per class, far more for "
                       "a meaningful per-class FD).")
        class_moments = {}
    for name, cm in class_moments.items():
        class_ref = reps.class_references[name]
        distances = per_class_frechet_distances(cm, class_ref)
        out[name]["per_class_fd"] = sum(distances.values()) / len(distances)
        out[name]["fjd"] = frechet_joint_distance(cm, class_ref)
        if args.fd_condition == "joint" and name in reps.encoders:
            alpha = loss_label_embedding(args, class_ref).alpha
            joint = joint_moments(cm, alpha)  # the loss's own reference (cached with its factor)
            out[name]["loss_fd"] = float(class_ref.joint_reference_at(alpha).frechet_distance(joint.mean, joint.covariance()))
    adherence = counter.all_reduce(device).compute() if counter is not None else None
    return out, adherence


def warm_start_populations(args, accelerator, gen, model, encoders, fd_loss) -> None:
    """Populations start from the exact moments of ``--fd_warmup_samples`` generated samples.

    One generation pass for all encoders; the features (fd_warmup_samples x d float32 per encoder and
    process) are kept until every population has taken them (its warm_start reduces over processes).
    """
    logger.info(f"Warm-starting the FD populations from {args.fd_warmup_samples} generated samples")
    chunks, label_chunks = {name: [] for name in encoders}, []
    for feats, labels in stream_features(accelerator, gen, model, args.fd_warmup_samples, args.seed + 1, encoders,
                                         args.sample_batch_size):
        for name in encoders:
            chunks[name].append(feats[name].detach() if feats is not None
                                else torch.zeros(0, encoders[name].feature_dim, device=accelerator.device))
        label_chunks.append(labels if labels is not None
                            else torch.zeros(0, dtype=torch.long, device=accelerator.device))
    for name, loss in fd_loss.losses.items():
        loss.warm_start(chunks[name], label_chunks if loss.label_embedding is not None else None)


def write_samples(args, accelerator, gen, model) -> None:
    """``--num_output_samples`` student samples as ``DIR/samples/000123.png`` (all processes write their share);
    class-conditional models with uniform labels: every class equally often, ``DIR/samples/<label>/000123.png``."""
    from fd_onestep.images import save_images

    sample_folder = Path(args.output_dir) / "samples"
    if accelerator.is_main_process:
        if sample_folder.exists():
            shutil.rmtree(sample_folder)
        sample_folder.mkdir(parents=True)
    accelerator.wait_for_everyone()
    balanced = gen.labeled and args.class_label_distribution == "uniform"
    for _ in stream_features(accelerator, gen, model, args.num_output_samples, args.seed + 4, {}, args.sample_batch_size,
                             on_images=lambda imgs, start, labels: save_images(imgs, sample_folder, start, labels),
                             balanced=balanced):
        pass
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------------------
# One optimization step
def train_step(args, accelerator, gen, denoiser, encoders, fd_loss, optimizer, lr_scheduler, ema, trainable, rng,
               progress, dump_gradients_to=None, discriminator=None):
    """One optimizer step over ``k`` micro-batches of ``--train_batch_size`` per process.

    ``k`` is ``--gradient_accumulation_steps`` (each micro-batch its own FD-loss against the population of the
    start of the step; the population advances once, at ``end_step``), or ``--fd_micro_batches`` for the exact
    population, whose loss needs a first no-grad pass over all micro-batches (the step's total moments) before
    each micro-batch's gradient pass (``end_step`` checks that the two passes saw the same features).
    ``dump_gradients_to``: a safetensors path for this step's gradients (``--debug_dump_first_step_grad``).
    ``discriminator`` (``--adv_weight``): its generator term joins each micro-batch's loss, and the head takes one
    step on the step's generated features after the generator's.
    Advances ``progress.global_step``; returns ``(logs, raw population FDs)``.
    """
    two_pass = fd_loss.two_pass
    k = args.fd_micro_batches if two_pass else args.gradient_accumulation_steps
    global_batch = args.train_batch_size * accelerator.num_processes
    micro = [draw_local_batch(accelerator, gen, global_batch, rng)[:2] for _ in range(k)]
    # the joint FD-loss also sees each batch's requested labels (the marginal one must not get them)
    labels_of = class_labels_of if fd_loss.joint else (lambda cond: None)
    fd_loss.begin_step()
    if two_pass:
        with torch.no_grad():
            for noise, cond in micro:
                fd_loss.accumulate(encode(generate_images(accelerator, gen, denoiser, noise, cond), encoders),
                                   labels_of(cond))
        fd_loss.end_accumulation()  # sum over processes (collective)
    objective, adv_terms, fakes = 0.0, [], []
    for i, (noise, cond) in enumerate(micro):
        if not two_pass:
            sync = accelerator.accumulate(denoiser)
        else:  # one gradient all-reduce per step, after the last micro-batch
            sync = contextlib.nullcontext() if i == k - 1 else accelerator.no_sync(denoiser)
        with sync:
            features = encode(generate_images(accelerator, gen, denoiser, noise, cond), encoders)
            loss, raw_fds = fd_loss(features, labels_of(cond))
            if discriminator is not None:
                adv = discriminator.generator_loss(features[args.adv_encoder])
                loss = loss + args.adv_weight * adv
                adv_terms.append(float(adv.detach()))
                fakes.append(features[args.adv_encoder].detach())
            accelerator.backward(loss)
        objective += float(loss.detach()) / k
    # EMA / queue: advance once with the step's k micro-batches; exact: pass 2 == pass 1, else an error (collective)
    fd_loss.end_step()
    if dump_gradients_to and accelerator.is_main_process:
        dump_gradients(accelerator, denoiser, dump_gradients_to, step=progress.global_step + 1)
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(trainable, max_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.step(trainable)
    adv_logs = {}
    if discriminator is not None:
        reduce = (lambda g: accelerator.reduce(g, reduction="mean")) if accelerator.num_processes > 1 else None
        adv_logs = {"adv/generator": sum(adv_terms) / k,
                    "adv/discriminator": discriminator.discriminator_step(torch.cat(fakes), rng, reduce)}
    progress.global_step += 1
    logs = {
        # sum_i w_i F_i of the population FDs: what the normalized objective below descends on
        "weighted_fd": fd_loss.weighted_fd(raw_fds),
        # sum_i w_i F_i / sg(F_i): its value is always sum_i w_i; logged to show it is what was optimized
        "objective": objective,
        "lr": lr_scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        **{f"fd/{name}": float(v) for name, v in raw_fds.items()},
        **adv_logs,
    }
    return logs, raw_fds


def dump_gradients(accelerator, denoiser, path, step: int) -> None:
    """The (DDP-averaged, unclipped) gradients of the trainable parameters as a safetensors file."""
    from safetensors.torch import save_file

    model = unwrap(accelerator, denoiser)
    grads = {n: p.grad.detach().cpu().contiguous() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(grads, str(path), metadata={"step": str(step), "processes": str(accelerator.num_processes)})


# --------------------------------------------------------------------------------------------------------
# Validation and saving
def keep_metric(args, fds, train_names) -> float:
    """The fresh-sample number ``--keep_best_by`` ranks pipelines by (lower is better)."""
    if args.keep_best_by == "fd_mean":
        return sum(fds[n]["fresh_fd"] for n in train_names) / len(train_names)
    if args.keep_best_by == "fd_r_mean":
        rs = [fds[n]["fd_r"] for n in train_names]
        if any(r is None for r in rs):
            raise ValueError(
                "--keep_best_by fd_r_mean needs validation_fd in every training encoder's reference stats "
                "(compute them with a validation split), or use 'fd_mean' or an encoder name."
            )
        return sum(rs) / len(rs)
    return fds[args.keep_best_by]["fresh_fd"]


def stock_recipe_of(pipe) -> dict | None:
    """The stock diffusers pipeline's one step equal to ``pipe``'s (``stock_one_step``), JSON-able; None where
    there is none (tanh output bound, class-conditional models, DiT)."""
    try:
        recipe = pipe.stock_one_step()
    except ValueError:
        return None
    return {"pipeline": recipe["pipeline"], "scheduler": type(recipe["scheduler"]).__name__,
            "scheduler_overrides": recipe["scheduler_overrides"], "call_kwargs": recipe["call_kwargs"]}


def lora_base_info(args, pipe) -> dict:
    info = {
        "base_model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "variant": args.variant,
        "one_step_settings": {k: pipe.config[k] for k in ("timestep", "prediction_type", "guidance_scale",
                                                          "output_bound", "sample_size", "max_sequence_length")},
        "how_to_load": "FDOneStepPipeline.from_teacher(base_model, **one_step_settings).load_lora_weights(dir)",
    }
    recipe = stock_recipe_of(pipe) if pipe.is_text_conditional else None
    if recipe is not None:  # the LCM-LoRA / TCD way: the stock pipeline with a one-step scheduler
        info["stock_pipeline"] = recipe
    return info


def save_weights(args, gen, model, folder: Path) -> None:
    """The generator ``model`` into ``folder``: the LoRA + its base-model info with --use_lora, else the whole
    one-step pipeline. Callers swap in the EMA weights first (:func:`ema_weights`)."""
    if args.use_lora:
        from fd_onestep.evaluation import LORA_INFO_FILE

        gen.save_lora(folder, denoiser=model)
        (folder / LORA_INFO_FILE).write_text(json.dumps(lora_base_info(args, gen.pipeline), indent=2))
    else:
        gen.save_pipeline(folder, denoiser=model)


def save_weights_atomically(args, gen, model, target: Path) -> None:
    """Main process: :func:`save_weights` into ``target``, replacing it only once the new folder is complete."""
    tmp = target.with_name(f".{target.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_weights(args, gen, model, tmp)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


def log_validation(args, accelerator, gen, model, reps: Representations, step: int, progress, population_fds) -> dict:
    """Validation grid, fresh-sample FDs in every representation, and the best pipeline so far (``DIR/best``).

    ``model`` is the unwrapped generator with the weights to validate (EMA swapped in by the caller).
    """
    from fd_onestep.images import image_grid

    output_dir = Path(args.output_dir)
    was_training = model.training
    model.eval()
    result = {"step": step}
    if args.num_validation_images and accelerator.is_main_process:
        rng = torch.Generator().manual_seed(args.seed + 2)
        noise = gen.sample_noise(args.num_validation_images, generator=rng, device=accelerator.device)
        cond = gen.sample_conditioning(args.num_validation_images, generator=rng, device=accelerator.device)
        with torch.no_grad():
            images = generate_images(accelerator, gen, model, noise, cond)
        (output_dir / "validation").mkdir(parents=True, exist_ok=True)
        grid = image_grid(images)
        grid.save(output_dir / "validation" / f"grid_{step:06d}.png")
        grid.save(output_dir / "validation_grid.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                from diffusers.image_processor import VaeImageProcessor

                np_images = VaeImageProcessor.denormalize(images).cpu().numpy()  # [-1, 1] -> [0, 1]
                tracker.writer.add_images("validation", np_images, step, dataformats="NCHW")
    if args.num_validation_samples:
        fds, adherence = fresh_sample_fds(args, accelerator, gen, model, reps, args.num_validation_samples,
                                          args.seed + 3, args.sample_batch_size)
        logs = {} if adherence is None else {"adherence": adherence}
        for name, r in fds.items():
            logs[f"fresh_fd/{name}"] = r["fresh_fd"]
            if r["fd_r"] is not None:
                logs[f"fd_r/{name}"] = r["fd_r"]
            for key in ("per_class_fd", "fjd"):
                if key in r:
                    logs[f"{key}/{name}"] = r[key]
            pop_fd = population_fds.get(name)
            r["population_fd"] = pop_fd
            # the population FD of a joint loss is a joint FD: compare it with the fresh samples' joint FD
            fresh = r.get("loss_fd", r["fresh_fd"])
            if pop_fd is not None and pop_fd > 0:
                ratio = fresh / pop_fd
                logs[f"fresh_over_population/{name}"] = ratio
                # below FRESH_FD_MIN_SAMPLES_PER_DIM samples per feature dimension the fresh FD's small-sample bias
                # alone can make the ratio large: no warning there (the ratio is still logged)
                enough = args.num_validation_samples >= FRESH_FD_MIN_SAMPLES_PER_DIM * reps.all_encoders[name].feature_dim
                if ratio > args.fresh_fd_warning_ratio and enough:
                    logger.warning(
                        f"step {step}: fresh-sample FD in {name} ({args.num_validation_samples} samples) is "
                        f"{ratio:.1f}x the population FD ({fresh:.4g} vs {pop_fd:.4g}): the generator is outrunning its "
                        "population statistics (which then lag behind it) or gaming the encoder. Lower "
                        "--learning_rate, shorten the population's memory (lower --fd_ema_beta or "
                        "--fd_queue_size), raise the batch, or use --fd_population exact; --keep_best_by "
                        "keeps the best pipeline so far."
                    )
        accelerator.log(logs, step=step)
        result["fds"] = fds
        result["adherence"] = adherence
        result["num_samples"] = args.num_validation_samples
        logger.info(f"step {step}: fresh-sample FD ({args.num_validation_samples} samples) " + ", ".join(
            f"{n}={r['fresh_fd']:.4g}" + (f" (FD_r {r['fd_r']:.3g})" if r["fd_r"] is not None else "")
            + (f" per-class {r['per_class_fd']:.4g}" if "per_class_fd" in r else "")
            for n, r in fds.items()) + ("" if adherence is None else f"; adherence {100 * adherence:.1f}%"))
        if args.keep_best_by is not None:
            metric = keep_metric(args, fds, list(reps.encoders))
            result["keep_metric"] = metric
            if progress.best_metric is None or metric < progress.best_metric:
                progress.best_metric, progress.best_step = metric, step
                best_dir = output_dir / "best"
                if accelerator.is_main_process:
                    save_weights_atomically(args, gen, model, best_dir)
                    (best_dir / "fd_onestep_best.json").write_text(json.dumps(
                        {"step": step, "keep_best_by": args.keep_best_by, "metric": metric, "fds": fds}, indent=2))
                logger.info(f"step {step}: new best {args.keep_best_by} = {metric:.4g} -> {best_dir}")
        progress.history.append({"step": step, **{f"fresh_fd/{n}": r["fresh_fd"] for n, r in fds.items()}})
    accelerator.wait_for_everyone()
    model.train(was_training)
    return result


def save_final_weights(args, accelerator, gen, model, progress) -> dict:
    """The output dir's pipeline (or LoRA): the last weights, or with ``--final_weights best`` the best ones."""
    output_dir = Path(args.output_dir)
    best_dir = output_dir / "best"
    use_best = args.final_weights == "best" and progress.best_step is not None and best_dir.is_dir()
    if accelerator.is_main_process:
        if use_best:
            logger.info(f"--final_weights best: the output pipeline is the step-{progress.best_step} one "
                        f"({args.keep_best_by} = {progress.best_metric:.4g}).")
            for entry in best_dir.iterdir():
                target = output_dir / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, target)
        else:
            save_weights(args, gen, model, output_dir)
    accelerator.wait_for_everyone()
    return {"which": "best" if use_best else "last", "step": progress.best_step if use_best else progress.global_step}


def run_text_comparison(args, accelerator, gen, model, reps: Representations):
    """The digits-text default's comparison: the text teacher used naively in one step, its multi-step sampler
    (the stock ``StableDiffusionPipeline``) and the one-step LoRA student, every image asked for a digit by a
    prompt in a phrasing drawn per image: the training phrasings (``DIR/comparison.*``) and the held-out ones
    (``DIR/held_out_phrasings/comparison.*``). Returns the training phrasings' report."""
    from types import SimpleNamespace

    from diffusers.image_processor import VaeImageProcessor

    from fd_onestep import comparison
    from fd_onestep.demos import digits
    from fd_onestep.demos.digits.baselines import digits_text_generators, load_digits_text_teachers
    from fd_onestep.comparison.generators import prompted_pipeline

    device = accelerator.device

    @torch.no_grad()
    def student(prompts, generator=None, output_type="pt"):  # the stock call the comparison makes
        cond = gen.encode_prompts(prompts, device=device)
        noise = gen.sample_noise(len(prompts), generator=generator, device=device)
        return SimpleNamespace(images=VaeImageProcessor.denormalize(generate_images(accelerator, gen, model, noise, cond)))

    classifier = reps.classifier_model or digits.load_digit_classifier(device=device)
    teachers = load_digits_text_teachers(sampler=args.teacher_sampler, device=device)
    reports = {}
    for tag, phrasings, out in (("training", digits.TRAINING_PHRASINGS, Path(args.output_dir)),
                                ("held out", digits.HELD_OUT_PHRASINGS, Path(args.output_dir) / "held_out_phrasings")):
        def prompts_for(labels, generator, phrasings=phrasings):
            return digits.digit_prompts(labels, phrasings, generator)

        generators = digits_text_generators(phrasings, sampler=args.teacher_sampler,
                                            num_inference_steps=args.teacher_num_inference_steps, teachers=teachers)
        naive, multistep = list(generators)
        generators["student, 1 step (FD-loss)"] = prompted_pipeline(student, prompts_for, description="1 step")
        folders = {naive: "teacher_naive", multistep: "teacher_multistep", "student, 1 step (FD-loss)": "student"}
        logger.info(f"Comparing on the {tag} phrasings")
        reports[tag] = comparison.compare_generators(
            generators, reps.all_encoders, reps.all_references, num_samples=args.num_comparison_samples,
            output_dir=out, held_out=set(reps.eval_encoders), classifier=classifier, batch_size=args.sample_batch_size,
            seed=args.seed, num_classes=gen.num_label_classes, class_references=reps.class_references,
            classifier_name=args.classifier or "digits", sample_folders=folders if args.write_comparison_samples else None,
        )
    return reports["training"]


def run_comparison(args, accelerator, gen, model, reps: Representations):
    """Teacher used naively in one step, teacher with its multi-step sampler, and the student: side-by-side grid
    (``comparison_grid.png``) and FD table (``comparison.md`` / ``comparison.json``) in every training and
    held-out representation, through :func:`fd_onestep.comparison.compare_generators`.

    Class-conditional: every generator gets the same balanced labels; the tables add adherence (the digit
    classifier, or ``--classifier``), per-class FD and FJD; the grid has one row per class.
    ``--write_comparison_samples``: every generator's samples under ``comparison_samples/<generator>/[<label>/]``.
    """
    from diffusers import DiffusionPipeline

    from fd_onestep import comparison

    device = accelerator.device
    teacher = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **teacher_load_kwargs(args)).to(device)
    teacher.set_progress_bar_config(disable=True)
    conditional = gen.is_class_conditional

    @torch.no_grad()
    def student(batch_size: int, generator: torch.Generator, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        noise = gen.sample_noise(batch_size, generator=generator, device=device)
        if class_labels is not None:  # the comparison's labels (the noise stream stays the teacher's)
            cond = gen.conditioning_for_labels(class_labels, device=device)
        else:
            cond = gen.sample_conditioning(batch_size, generator=generator, device=device)
        return generate_images(accelerator, gen, model, noise, cond)

    naive = "teacher, 1 step (naive)"
    multistep = f"teacher, {args.teacher_sampler} {args.teacher_num_inference_steps} steps"
    generators = {
        naive: comparison.naive_one_step_teacher(teacher),
        multistep: comparison.teacher_sampler(teacher, args.teacher_num_inference_steps, args.teacher_sampler,
                                              null_class_label=gen.pipeline.config.null_class_label),
        "student, 1 step (FD-loss)": student,
    }
    folders = {naive: "teacher_naive", multistep: "teacher_multistep", "student, 1 step (FD-loss)": "student"}
    classifier = reps.classifier_model
    if classifier is None and args.embedded_default:  # the class histogram of the digits default
        from fd_onestep.demos import digits

        classifier = digits.load_digit_classifier(device=device)
    return comparison.compare_generators(
        generators,
        reps.all_encoders,
        reps.all_references,
        num_samples=args.num_comparison_samples,
        output_dir=Path(args.output_dir),
        held_out=set(reps.eval_encoders),
        classifier=classifier,
        batch_size=args.sample_batch_size,
        seed=args.seed,
        num_classes=gen.num_classes if conditional else None,
        class_references=reps.class_references if conditional else None,
        classifier_name=(args.classifier or "digits") if conditional and classifier is not None else None,
        sample_folders=folders if args.write_comparison_samples else None,
    )


def save_model_card(args, pipe, reps: Representations, last_validation, population_fds, progress, world, repo_id):
    """``DIR/README.md``: the model card (base model, encoders and stats, training settings, final FDs)."""
    output_dir = Path(args.output_dir)

    def describe(encs, refs, stats_paths, weights=None):
        rows = []
        for i, name in enumerate(encs):
            meta = refs[name].metadata or {}
            row = {"name": name, "encoder_id": encs[name].encoder_id, "feature_dim": encs[name].feature_dim,
                   "stats": f"{Path(stats_paths[i]).name} ({refs[name].num_samples} images"
                            + (f", {meta['dataset']}" if meta.get("dataset") else "") + ")"}
            if weights is not None:
                row["weight"] = weights[i]
            rows.append(row)
        return rows

    final_fds = []
    fds = (last_validation or {}).get("fds") or {}
    for name in reps.all_encoders:
        r = fds.get(name, {})
        final_fds.append({"encoder": name, "in_loss": name in reps.encoders, "population_fd": population_fds.get(name),
                          "fresh_fd": r.get("fresh_fd"), "fd_r": r.get("fd_r")})
    training = {
        "steps": progress.global_step,
        "batch per process": args.train_batch_size,
        "processes": world,
        "samples per update": args.train_batch_size * world * (
            args.fd_micro_batches if args.fd_population == "exact" else args.gradient_accumulation_steps),
        "learning rate": f"{args.learning_rate:g} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps)",
        "optimizer": f"AdamW (betas {args.adam_beta1}, {args.adam_beta2}; weight decay {args.adam_weight_decay}"
                     f"{'; fused' if args.adam_fused else ''})",
        "FD population": {"ema": f"EMA, beta {args.fd_ema_beta}", "queue": f"queue of {args.fd_queue_size} samples",
                          "exact": f"exact two-pass, {args.fd_micro_batches} micro-batches"}[args.fd_population]
                         + (f", warm start from {args.fd_warmup_samples} samples" if args.fd_warmup_samples else ""),
        **({"FD-loss": "joint: [features, alpha * one_hot(label)], alpha = "
                       f"{args.fd_label_scale:g} x the reference's trace-matching scale" if args.fd_condition == "joint"
                       else "marginal (features only)"} if pipe.is_class_conditional else {}),
        "one-step timestep": pipe.config.timestep,
        "parameterization": pipe.config.prediction_type,
        "output bound": pipe.config.output_bound or "none",
        "trained weights": f"LoRA rank {args.lora_rank}" if args.use_lora else "full denoiser",
        "generator EMA": f"decay {args.ema_decay}" if args.use_ema else "no",
        **({"adversarial term": f"{args.adv_loss} loss, weight {args.adv_weight:g}, discriminator head on "
                                f"{args.adv_encoder} features"} if args.adv_weight else {}),
        "mixed precision": args.mixed_precision or "no",
    }
    if progress.best_step is not None:
        training["best checkpoint"] = f"step {progress.best_step} by {args.keep_best_by} ({progress.best_metric:.4g})"
    base = args.pretrained_model_name_or_path
    base_id = teacher_hub_id(base)
    license_info = teacher_license(base, hub_id=base_id, revision=args.revision, cache_dir=args.cache_dir,
                                   local_files_only=args.local_files_only)
    if args.embedded_default and not args.use_lora:
        base = (f"fd_onestep bundled {'class-conditional ' if pipe.is_class_conditional else ''}digits teacher "
                f"(fd_onestep/demos/digits/assets/{Path(args.pretrained_model_name_or_path).name})")
    one_step_settings = stock_recipe = None
    if args.use_lora:  # what the LoRA's snippet must rebuild: the base with the run's one-step settings
        info = lora_base_info(args, pipe)
        one_step_settings = {**{k: info[k] for k in ("revision", "variant") if info[k] is not None},
                             **info["one_step_settings"]}
        stock_recipe = info.get("stock_pipeline")
    conditioning = "text" if pipe.is_text_conditional else "class" if pipe.is_class_conditional else "unconditional"
    grid = "validation_grid.png" if (output_dir / "validation_grid.png").is_file() else None
    from fd_onestep.comparison.report import GRID_FILENAME, TABLE_FILENAME

    comparison_grid = GRID_FILENAME if (output_dir / GRID_FILENAME).is_file() else None
    comparison_table = (output_dir / TABLE_FILENAME).read_text() if (output_dir / TABLE_FILENAME).is_file() else None
    card = render_model_card(
        base_model=base, base_model_id=base_id, model_family=pipe.family,
        encoders=describe(reps.encoders, reps.references, args.reference_stats, args.encoder_loss_weights),
        eval_encoders=describe(reps.eval_encoders, reps.eval_references, args.eval_reference_stats),
        training=training, final_fds=final_fds, sample_grid=grid, repo_id=repo_id or str(output_dir),
        lora=args.use_lora, conditioning=conditioning, one_step_settings=one_step_settings,
        comparison_grid=comparison_grid, comparison_table=comparison_table, stock_recipe=stock_recipe,
        fresh_samples=(last_validation or {}).get("num_samples"), **license_info,
    )
    card.save(str(output_dir / "README.md"))
    return card


# --------------------------------------------------------------------------------------------------------
def main(args) -> dict:
    """Train; returns a summary dict (also written to DIR/fd_onestep_summary.json)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = build_accelerator(args)
    device, world = accelerator.device, accelerator.num_processes
    check_inputs(args)
    output_dir = Path(args.output_dir)
    fingerprint, resume_path, hub_repo_id, hub_token, lock = check_run_setup(args, accelerator)
    set_seed(args.seed)

    # The one-step generator from the teacher, the encoders with their reference statistics, the FD-loss.
    pipe = build_one_step_pipeline(args)
    reps = build_representations(args, device)
    prompts, prompt_labels, class_histogram = load_conditioning(args, pipe, reps)
    gen, trainable = build_generator(args, pipe, reps, prompts, prompt_labels, class_histogram, device,
                                     weight_dtype_of(accelerator))
    fd_loss = build_fd_loss(args, reps, device)
    discriminator = build_discriminator(args, gen, reps, device)
    optimizer, lr_scheduler, ema = build_optimizer(args, trainable, accelerator)
    sampling_rng = CheckpointableGenerator(args.seed)
    progress = TrainingProgress()
    register_checkpoint_hooks(accelerator, args, gen, fd_loss, ema, sampling_rng, progress, fingerprint, discriminator)
    denoiser, optimizer, lr_scheduler = accelerator.prepare(gen.denoiser, optimizer, lr_scheduler)

    if accelerator.is_main_process and args.report_to:
        tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                          for k, v in public_args(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)
    steps_per_update = args.fd_micro_batches if fd_loss.two_pass else args.gradient_accumulation_steps
    logger.info("***** FD-loss one-step training *****")
    logger.info(f"  family = {pipe.family}, prediction = {pipe.config.prediction_type}, timestep = "
                f"{pipe.config.timestep}, output_bound = {pipe.config.output_bound}, noise shape = {gen.noise_shape}, "
                f"image shape = {gen.image_shape}")
    logger.info(f"  encoders = {list(reps.encoders)} (eval only: {list(reps.eval_encoders)}), population = "
                f"{args.fd_population}")
    logger.info(f"  batch per process = {args.train_batch_size}, processes = {world}, samples per update = "
                f"{args.train_batch_size * world * steps_per_update}, steps = {args.max_train_steps}, trainable "
                f"parameters = {sum(p.numel() for p in trainable):,}{' (LoRA)' if args.use_lora else ''}")
    logger.info(f"  run fingerprint = {fingerprint_digest(fingerprint)}")

    # Resume, or warm-start the populations from generated samples.
    if resume_path is not None:
        logger.info(f"Resuming from {resume_path}")
        load_checkpoint(accelerator, resume_path)
        logger.info(f"  resumed at step {progress.global_step}")
    elif args.fd_warmup_samples > 0 and not fd_loss.two_pass:
        warm_start_populations(args, accelerator, gen, unwrap(accelerator, denoiser), reps.encoders, fd_loss)

    # Training loop.
    stop_at = min(args.max_train_steps, args.stop_after_steps or args.max_train_steps)
    progress_bar = tqdm(range(args.max_train_steps), initial=progress.global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    train_start = time.time()
    population_fds: dict[str, float] = {}
    last_validation = None
    first_step_of_run = True
    stop_request = StopRequest().install()
    interrupted = False
    while progress.global_step < stop_at:
        logs, raw_fds = train_step(
            args, accelerator, gen, denoiser, reps.encoders, fd_loss, optimizer, lr_scheduler, ema, trainable,
            sampling_rng.generator, progress,
            dump_gradients_to=args.debug_dump_first_step_grad if first_step_of_run else None,
            discriminator=discriminator,
        )
        first_step_of_run = False
        step = progress.global_step
        progress_bar.update(1)
        population_fds.update({k: float(v) for k, v in raw_fds.items()})
        accelerator.log(logs, step=step)
        progress_bar.set_postfix(weighted_fd=f"{logs['weighted_fd']:.4g}",
                                 **{k: f"{float(v):.4g}" for k, v in raw_fds.items()})
        if args.validation_steps and step % args.validation_steps == 0 and step < args.max_train_steps:
            with ema_weights(ema, trainable):
                last_validation = log_validation(args, accelerator, gen, unwrap(accelerator, denoiser), reps, step,
                                                 progress, population_fds)
        stopping_early = step == stop_at < args.max_train_steps  # --stop_after_steps: resume needs this state
        interrupted = stop_request.agreed(accelerator)  # SIGTERM / SIGINT on any process: the same step on all
        if stopping_early or interrupted or (args.checkpointing_steps and (step % args.checkpointing_steps == 0
                                                                         or step == stop_at)):
            save_checkpoint(accelerator, args, step, fingerprint)
        if interrupted:
            break
    stop_request.restore()
    progress_bar.close()
    accelerator.wait_for_everyone()
    summary = {"global_step": progress.global_step, "train_seconds": time.time() - train_start,
               "final_population_fds": dict(population_fds)}
    if interrupted:
        summary["interrupted_by"] = stop_request.received or "a signal to another process"
        logger.warning(f"Stopped by {summary['interrupted_by']} at step {progress.global_step}, saved as "
                       f"checkpoint-{progress.global_step}; continue with the same command and "
                       "--resume_from_checkpoint latest.")
        accelerator.end_training()
        lock.release()
        return summary
    if progress.global_step < args.max_train_steps:
        logger.info(f"Stopped at step {progress.global_step} (--stop_after_steps); resume with "
                    "--resume_from_checkpoint latest.")
        accelerator.end_training()
        lock.release()
        return summary

    # The end: final validation, the output weights, samples, the comparison, the model card, the Hub.
    model = unwrap(accelerator, denoiser)
    with ema_weights(ema, trainable):
        if args.validation_steps is not None and (args.num_validation_samples or args.num_validation_images):
            last_validation = log_validation(args, accelerator, gen, model, reps, progress.global_step, progress,
                                             population_fds)
        summary["final_validation"] = last_validation
        summary["final_weights"] = save_final_weights(args, accelerator, gen, model, progress)
        if args.num_output_samples:
            write_samples(args, accelerator, gen, model)
        summary["comparison"] = None
        if args.compare_with_teacher and accelerator.is_main_process:
            logger.info("Comparing the student with its teacher (naive one step, multi-step sampler)")
            compare = run_text_comparison if gen.is_text_conditional else run_comparison
            summary["comparison"] = compare(args, accelerator, gen, model, reps)
            summary["comparison_table"] = str(output_dir / "comparison.md")
    if accelerator.is_main_process:
        card = save_model_card(args, pipe, reps, last_validation, population_fds, progress, world, hub_repo_id)
        summary["model_card"] = str(output_dir / "README.md")
        (output_dir / "fd_onestep_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        honour_umask(output_dir)  # the weights (safetensors writes 0600) get the umask's mode like every other file
        if args.push_to_hub:
            card.validate()  # the Hub's own card validation (network)
            push_folder_to_hub(output_dir, hub_repo_id, hub_token, private=args.hub_private_repo or None)
            logger.info(f"Pushed {output_dir} to https://huggingface.co/{hub_repo_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    lock.release()
    return summary


if __name__ == "__main__":
    # expected errors (bad input, refused runs, damaged checkpoints): one `error:` line, exit status 2
    sys.exit(run_reporting_errors("train_fd_onestep.py", lambda: main(parse_args()) and 0))
