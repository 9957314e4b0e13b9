#!/usr/bin/env python
# Copyright 2025 The fd-onestep authors. Licensed under the Apache License, Version 2.0.
"""Turn a multi-step diffusers model into a one-step generator by optimizing FD-loss.

    accelerate launch train_scripts/train_fd_onestep.py \
        --pretrained_model_name_or_path google/ddpm-cifar10-32 \
        --encoders inception dinov2 --reference_stats stats/inception.safetensors stats/dinov2.safetensors \
        --output_dir ddpm-cifar10-onestep

With no ``--pretrained_model_name_or_path`` / ``--encoders`` / ``--reference_stats`` (and no ``--config``) the
script runs the offline embedded default, the bundled config ``digits`` (``--embedded_default`` picks another
bundled one, ``--config FILE`` any config file): a small JSON file of argument values that become the parser's
defaults, so a flag on the command line wins (fd_onestep/training/config.py). The run prints every value its
config set and writes them to its arguments file; ``--show_config`` prints them and exits.

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
import os
import sys
import time
from pathlib import Path

import torch

# The script runs on the installed package (pipelines/ becomes fd_onestep.pipelines only through the install).
if importlib.util.find_spec("fd_onestep") is None or importlib.util.find_spec("fd_onestep.pipelines") is None:
    sys.exit("train_fd_onestep.py needs the fd-onestep package installed: run `pip install -e .` (or "
             "`pip install .`) in the repository root, then run the script again.")

# diffusers, transformers and the pipeline (10-15 s of imports on a loaded 2-core machine, measured) are imported
# inside the functions that need them. The parser is one of those: its help lists the families from the adapter
# registry (pipelines/pipeline_fd_onestep.py), so every entry point, --help included, imports diffusers once.
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import ProjectConfiguration, set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from fd_onestep.errors import RunError, run_reporting_errors  # noqa: E402,F401
from fd_onestep.losses import FDLoss, MultiEncoderFDLoss  # noqa: E402
from fd_onestep.populations import build_population  # noqa: E402
from fd_onestep.training.checkpoint_hooks import load_checkpoint, register_checkpoint_hooks, save_checkpoint  # noqa: E402
from fd_onestep.training.sharded_run import (build_prompt_store, clip_gradients,  # noqa: E402
                                             prepare_denoiser)
from fd_onestep.training.sharding import is_sharded, run_on_main_process  # noqa: E402
from fd_onestep.training.checks import (  # noqa: E402,F401  (the checks live there; tests reach them here)
    check_args,
    check_inputs,
    check_run_setup,
    join_negative_values,
    prompt_token_limits,
    raise_if_main_refused,
    warn_long_prompts,
)
from fd_onestep.training.checkpoints import note_finished_run  # noqa: E402
from fd_onestep.training.preemption import before_stop_checkpoint  # noqa: E402
from fd_onestep.training.config import (  # noqa: E402
    Config,
    apply_config,
    bundled_config_path,
    bundled_configs,
    config_report,
    config_values_in_effect,
    select_config,
)
from fd_onestep.training.generation import (  # noqa: E402
    class_labels_of,
    draw_local_batch,
    ema_weights,
    encode,
    generate_images,
    stream_features,
    unwrap,
    warm_start_populations,
    write_samples,
)
from fd_onestep.demo import prepare_space, publish_space  # noqa: E402
from fd_onestep.training.hub import push_folder_to_hub  # noqa: E402
from fd_onestep.training.inputs import load_caption_dataset, load_conditioning, teacher_load_kwargs  # noqa: E402,F401
from fd_onestep.training.model_card import render_model_card, teacher_hub_id, teacher_license  # noqa: E402
from fd_onestep.training.output_dir import honour_umask  # noqa: E402
from fd_onestep.training.representations import (  # noqa: E402,F401
    Representations,
    build_representations,
    demo_of,
    encoder_label,
    label_aliases,
)
from fd_onestep.training.run_args import fingerprint_digest, public_args, run_fingerprint  # noqa: E402,F401
from fd_onestep.training.saving import (gather_weights, lora_base_info, save_final_weights,  # noqa: E402,F401
                                        save_weights_atomically)
from fd_onestep.training.state import CheckpointableGenerator, TrainingProgress  # noqa: E402
from fd_onestep.training.stop import StopRequest  # noqa: E402
from fd_onestep.training.teacher_comparison import run_comparison  # noqa: E402
from fd_onestep.training.validation import (  # noqa: E402
    FRESH_FD_MIN_SAMPLES_PER_DIM,
    fresh_sample_fds,
    keep_metric,
    loss_label_embedding,
)

logger = get_logger("train_fd_onestep", log_level="INFO")

# The config of the no-argument command (the offline embedded default): a bundled config file, by name.
DEFAULT_EMBEDDED = "digits"
POPULATIONS = ("ema", "queue", "exact")
FD_CONDITIONS = ("marginal", "joint")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
OUTPUT_BOUND_CHOICES = ("none", "tanh", "clamp")


def _positive_int(value: str) -> int:
    out = int(value)
    if out < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return out


def build_parser() -> argparse.ArgumentParser:
    from fd_onestep.pipelines.pipeline_fd_onestep import supported_families_text  # the adapter registry

    p = argparse.ArgumentParser(
        description="FD-loss one-step training (see the module docstring and docs/training.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="Multi-step diffusers pipeline (Hub id or folder) of a supported family: "
                        f"{supported_families_text()}. Omit (with --encoders and --reference_stats) for the "
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

    g = p.add_argument_group("config (a recipe as a file: its values become the defaults; flags win)")
    g.add_argument("--config", type=str, nargs="+", default=None,
                   help="JSON config file(s) of argument values (later ones win), e.g. a copy of a bundled one. "
                        "Without --config and without --pretrained_model_name_or_path / --encoders / "
                        f"--reference_stats the run uses the bundled config {DEFAULT_EMBEDDED!r} "
                        f"({bundled_config_path(DEFAULT_EMBEDDED)}); see its values with "
                        "`train_fd_onestep.py --show_config`. The defaults shown here are those of a run without config.")
    g.add_argument("--embedded_default", type=str, default=None, choices=sorted(bundled_configs()),
                   help="Which bundled config (offline embedded default) runs: digits (unconditional, the default), "
                        "digits-class (class-conditional teacher, adherence, per-class FD and FJD, samples per class) "
                        "or digits-text (a one-step LoRA on the Stable Diffusion-family digits teacher, prompts that "
                        "name the digit). Its encoders and statistics may be replaced (--encoders with "
                        "--reference_stats); its teacher may not.")
    g.add_argument("--preset", type=str, default=None, choices=sorted(bundled_configs("presets")),
                   help="A bundled config on top of the digits default (with --embedded_default: of that one): "
                        "quality = a longer cosine schedule with an EMA of the generator's weights (docs/quality.md).")
    g.add_argument("--show_config", action="store_true",
                   help="Print the values the config sets (after --config / --embedded_default / --preset and the "
                        "command line) and exit.")
    g.add_argument("--plan", action="store_true",
                   help="Print the plan of exactly this run (memory per GPU by part, compute, step time: "
                        "`fd-onestep plan`, docs/plan.md) and exit: nothing allocated, no weights loaded.")
    g.add_argument("--gpu_memory_gb", type=float, default=80.0, help="--plan: memory of one GPU (GB = 1e9 bytes).")

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
    g.add_argument("--prompt_embeddings_dir", type=str, default=None,
                   help="Text models: folder of the prompt embeddings on disk, encoded once and reused by a resumed "
                        "run or a run with the same prompts and text encoders (default: DIR/prompt_embeddings).")
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
    g.add_argument("--eval_clip_model", type=str, default=None,
                   help="Text-to-image: CLIP score of --num_validation_samples fresh samples (prompts drawn from the "
                        "training prompts) in validation: a transformers CLIP / SigLIP with a text tower, local folder "
                        "or Hub id (docs/evaluation.md).")
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
    g.add_argument("--hub_space", action="store_true",
                   help="Also write the Gradio demo (fd-onestep demo) as a Space folder DIR/space, linked from the model "
                        "card; with --push_to_hub it is uploaded as the Space <hub_model_id>-demo.")

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


def finalize_args(args, config: Config, plain: dict) -> argparse.Namespace:
    """Record the config (its values in effect, ``--embedded_default``, the demo hooks) and check every argument
    that needs no model (:func:`fd_onestep.training.checks.check_args`)."""
    args.config = config.files or None
    args.embedded_default = config.embedded_default
    args.demo = config.values.get("demo")
    args.config_values = config_values_in_effect(args, config, plain)
    required = ("pretrained_model_name_or_path", "encoders") + (() if args.plan else ("reference_stats",))
    missing = [n for n in required if getattr(args, n) is None]
    if missing:
        raise ValueError(
            "give --pretrained_model_name_or_path, --encoders and --reference_stats together (missing: "
            + ", ".join("--" + m for m in missing)
            + "), or none of them for the offline embedded digits default."
        )
    if args.plan:
        return args
    return check_args(args)


def parse_args(input_args=None) -> argparse.Namespace:
    """diffusers' way with nanoGPT's configs: the config's values become the parser's defaults, so a flag given on
    the command line wins; the first pass only learns which config (argparse's defaults: no config)."""
    parser = build_parser()
    input_args = join_negative_values(parser, sys.argv[1:] if input_args is None else list(input_args))
    config = select_config(parser.parse_known_args(input_args)[0], DEFAULT_EMBEDDED)
    plain = apply_config(parser, config)
    args = parser.parse_args(input_args)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    return finalize_args(args, config, plain)


# --------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------
# Building the run: accelerator, early checks, one-step pipeline, encoders, generator, loss, optimizer
def build_accelerator(args):
    """Accelerator + logging, the diffusers-examples way."""
    import diffusers
    import transformers
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


def build_generator(args, pipe, reps: Representations, prompts, prompt_labels, class_histogram, accelerator,
                    weight_dtype=None):
    """The trainable one-step generator (full denoiser or a LoRA on it). Returns ``(gen, trainable params)``.

    Under mixed precision (``weight_dtype``) the frozen VAE / text encoders and a LoRA's base weights are cast
    to the weight dtype and the LoRA parameters kept in float32 (``OneStepGenerator.add_lora``), as diffusers'
    examples do; a full fine-tune keeps its float32 weights. Text-to-image: the prompts are encoded once into the
    prompt store on disk (``--prompt_embeddings_dir``), then the text encoders leave the device.
    """
    from fd_onestep.onestep import OneStepGenerator, prepare_training
    from fd_onestep.prompt_store import offload_text_encoders

    if args.debug_float64:
        weight_dtype = None  # float64 everywhere: nothing is cast down
        for module in [pipe.denoiser, *(getattr(pipe, n) for n in pipe.frozen_component_names),
                       *reps.all_encoders.values()]:
            module.to(torch.float64)
    store = build_prompt_store(args, accelerator, pipe, prompts, weight_dtype)
    gen = OneStepGenerator(pipe, prompts=prompts, prompt_labels=prompt_labels, class_histogram=class_histogram,
                           device=accelerator.device, weight_dtype=weight_dtype,
                           decode_savers=build_decode_savers(args, pipe), prompt_store=store)
    if store is not None:
        offload_text_encoders(pipe)
    trainable = prepare_training(
        gen, use_lora=args.use_lora, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_target_modules=args.lora_target_modules, gradient_checkpointing=args.gradient_checkpointing,
        vae_gradient_checkpointing=args.vae_gradient_checkpointing, channels_last=args.channels_last)
    return gen, trainable


def build_fd_loss(args, reps: Representations, device):
    """``MultiEncoderFDLoss`` over the training encoders, one population of ``--fd_population`` each, created on
    ``device`` (the process's: NCCL reduces CUDA tensors only)."""
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
    else:  # the demo's own real images (its config names the demo)
        batches = demo_of(args).real_images(args.adv_max_real_images).split(args.sample_batch_size)
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
    """AdamW and the lr schedule."""
    from diffusers.optimization import get_scheduler

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
    return optimizer, lr_scheduler


def build_ema(args, trainable, accelerator):
    """``--use_ema``: the generator-weights EMA of the prepared (under FSDP2: sharded) trainable parameters."""
    from diffusers.training_utils import EMAModel

    ema = None
    if args.use_ema:
        ema = EMAModel(trainable, decay=args.ema_decay, update_after_step=args.ema_update_after_step,
                       use_ema_warmup=args.ema_use_warmup, inv_gamma=args.ema_inv_gamma, power=args.ema_power)
        ema.to(accelerator.device)
    return ema


# --------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------


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
    if dump_gradients_to:  # every process: a sharded denoiser's gradients are gathered from all
        dump_gradients(accelerator, denoiser, dump_gradients_to, step=progress.global_step + 1)
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
    grad_norm = clip_gradients(accelerator, denoiser, trainable, max_norm)
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
    """The (process-averaged, unclipped) gradients of the trainable parameters as a safetensors file, written by
    the main process (call on every process: a sharded denoiser's are gathered from all)."""
    from safetensors.torch import save_file

    from fd_onestep.training.sharding import full_gradients

    if not accelerator.is_main_process and not is_sharded(denoiser):
        return  # replicated (DDP): the main process's gradients are every process's
    grads = full_gradients(unwrap(accelerator, denoiser))  # sharded: a collective
    if not accelerator.is_main_process:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(grads, str(path), metadata={"step": str(step), "processes": str(accelerator.num_processes)})


# --------------------------------------------------------------------------------------------------------


def save_validation_grid(args, accelerator, gen, model, step: int) -> None:
    """Main process: ``--num_validation_images`` samples of fixed noise as ``DIR/validation/grid_<step>.png`` (and
    ``DIR/validation_grid.png``, TensorBoard's ``validation`` images)."""
    from fd_onestep.images import image_grid

    output_dir = Path(args.output_dir)
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


def log_validation(args, accelerator, gen, model, reps: Representations, step: int, progress, population_fds) -> dict:
    """Validation grid, CLIP score, fresh-sample FDs in every representation, and the best pipeline so far
    (``DIR/best``). Every process calls it: the FDs are computed over all, and the parts the main process runs alone
    (grid, CLIP score) have the others join a sharded denoiser's forwards (:func:`run_on_main_process`).

    ``model`` is the unwrapped generator with the weights to validate (EMA swapped in by the caller).
    """
    output_dir = Path(args.output_dir)
    was_training = model.training
    model.eval()
    result = {"step": step}
    if args.num_validation_images:
        run_on_main_process(accelerator, model, lambda m: save_validation_grid(args, accelerator, gen, m, step))
    if args.eval_clip_model:
        from fd_onestep.clip_score import generator_clip_score

        def clip_score(m):
            return generator_clip_score(args.eval_clip_model, gen, lambda n, c: generate_images(accelerator, gen, m, n, c),
                                        args.num_validation_samples or args.num_validation_images, seed=args.seed + 4,
                                        batch_size=args.sample_batch_size, device=accelerator.device)

        clip = run_on_main_process(accelerator, model, clip_score)
        if accelerator.is_main_process:
            result["clip_score"] = {"model": clip.name, "score": clip.compute(), "num_samples": clip.count}
            accelerator.log({"clip_score": clip.compute()}, step=step)
            logger.info(f"step {step}: CLIP score {clip.compute():.2f} ({clip.count} samples, {clip.name})")
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
                gathered = gather_weights(args, model)  # a sharded model: every process takes part
                if accelerator.is_main_process:
                    save_weights_atomically(args, gen, model, best_dir, gathered)
                    (best_dir / "fd_onestep_best.json").write_text(json.dumps(
                        {"step": step, "keep_best_by": args.keep_best_by, "metric": metric, "fds": fds}, indent=2))
                logger.info(f"step {step}: new best {args.keep_best_by} = {metric:.4g} -> {best_dir}")
        progress.history.append({"step": step, **{f"fresh_fd/{n}": r["fresh_fd"] for n, r in fds.items()}})
    accelerator.wait_for_everyone()
    model.train(was_training)
    return result


def save_model_card(args, pipe, reps: Representations, last_validation, population_fds, progress, world, repo_id,
                    demo_space=None):
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
    demo = demo_of(args)
    base = (demo.model_card_base(args, pipe) if demo is not None else None) or base
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
        demo_space=demo_space.card_entry() if demo_space is not None else None,
    )
    card.save(str(output_dir / "README.md"))
    return card


def show_config(args) -> dict:
    """``--show_config``: the config files and every value they set in this run, one a line."""
    print("\n".join(config_report(args)[0]) or "no config: the defaults of `train_fd_onestep.py --help`")
    return dict(args.config_values or {})


def print_plan(args) -> dict:
    """``--plan``: the plan of this run (``fd-onestep plan`` with the same flags): fake tensors, no weights."""
    from fd_onestep.plan import make_plan, settings_from_args

    plan = make_plan(settings_from_args(args))
    print(plan.to_markdown())
    return plan.to_dict()


# --------------------------------------------------------------------------------------------------------
def main(args) -> dict:
    """Train; returns a summary dict (also written to DIR/fd_onestep_summary.json)."""
    if args.show_config or args.plan:  # answers without an accelerator or a model
        return show_config(args) if args.show_config else print_plan(args)
    accelerator = build_accelerator(args)
    config_lines, config_warnings = config_report(args)
    for line in config_lines:  # every value the config set, one line each (also in DIR/fd_onestep_run_args.json)
        logger.info(line)
    for warning in config_warnings:
        logger.warning(warning)
    device, world = accelerator.device, accelerator.num_processes
    check_inputs(args)
    output_dir = Path(args.output_dir)
    fingerprint, resume_path, hub_repo_id, hub_token, lock = check_run_setup(args, accelerator)
    set_seed(args.seed)

    # The one-step generator from the teacher, the encoders with their reference statistics, the FD-loss.
    pipe = build_one_step_pipeline(args)
    reps = build_representations(args, device)
    prompts, prompt_labels, class_histogram = load_conditioning(args, pipe, reps)
    warn_long_prompts(prompts, prompt_token_limits(pipe))
    gen, trainable = build_generator(args, pipe, reps, prompts, prompt_labels, class_histogram, accelerator,
                                     weight_dtype_of(accelerator))
    fd_loss = build_fd_loss(args, reps, device)
    discriminator = build_discriminator(args, gen, reps, device)
    optimizer, lr_scheduler = build_optimizer(args, trainable, accelerator)
    # under FSDP2 (several processes) sharded block by block; trainable: the prepared parameters
    denoiser, optimizer, lr_scheduler, trainable = prepare_denoiser(accelerator, gen, optimizer, lr_scheduler, trainable)
    ema = build_ema(args, trainable, accelerator)
    sampling_rng = CheckpointableGenerator(args.seed)
    progress = TrainingProgress()
    register_checkpoint_hooks(accelerator, args, gen, fd_loss, ema, sampling_rng, progress, fingerprint, discriminator,
                              sharded=is_sharded(denoiser))

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
        note_finished_run(progress.global_step, args.max_train_steps, resume_path)
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
        if interrupted:  # a launcher that kills the script before this checkpoint is written: say what is kept
            before_stop_checkpoint(args.output_dir, step)
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
        if args.compare_with_teacher:
            logger.info("Comparing the student with its teacher (naive one step, multi-step sampler)")
            demo = demo_of(args)  # a demo's config names its own comparison
            compare = demo.run_comparison if demo is not None else run_comparison
            summary["comparison"] = run_on_main_process(accelerator, model,
                                                        lambda m: compare(args, accelerator, gen, m, reps))
            summary["comparison_table"] = str(output_dir / "comparison.md")
    if accelerator.is_main_process:
        space = prepare_space(output_dir, hub_repo_id, hub_token, push=args.push_to_hub) if args.hub_space else None
        card = save_model_card(args, pipe, reps, last_validation, population_fds, progress, world, hub_repo_id, space)
        summary["model_card"] = str(output_dir / "README.md")
        (output_dir / "fd_onestep_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        honour_umask(output_dir)  # the weights (safetensors writes 0600) get the umask's mode like every other file
        if args.push_to_hub:
            card.validate()  # the Hub's own card validation (network)
            push_folder_to_hub(output_dir, hub_repo_id, hub_token, private=args.hub_private_repo or None)
            logger.info(f"Pushed {output_dir} to https://huggingface.co/{hub_repo_id}")
            if space is not None:
                publish_space(space, hub_token, private=args.hub_private_repo or None)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    lock.release()
    return summary


if __name__ == "__main__":
    # expected errors (bad input, refused runs, damaged checkpoints): one `error:` line, exit status 2
    sys.exit(run_reporting_errors("train_fd_onestep.py", lambda: main(parse_args()) and 0))
