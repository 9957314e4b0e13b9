#!/usr/bin/env python
"""Train a bundled digits teacher: a diffusers ``DDPMPipeline`` folder on scikit-learn's digits.

Two teachers come from this script: ``teacher`` (unconditional) and, with ``--class_conditional``,
``teacher-class``: the same UNet with ``num_class_embeds = 11`` (digits 0-9 and the null class 10, the label
of dropped conditioning: each training label is replaced by it with ``--class_dropout_prob``), so that
classifier-free guidance works. There is no stock diffusers pipeline for a class-conditional
``UNet2DModel``; the folder is a ``DDPMPipeline`` layout (``DiffusionPipeline.from_pretrained`` loads it) and
``fd_onestep.comparison.teacher_sampler`` samples it with class labels.

The teacher is a small ``UNet2DModel`` (16x16, 1 channel) with **v-prediction** on **zero-terminal-SNR**
betas (``DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
timestep_spacing="trailing")``). At the top timestep alphas_cumprod[T] = 0, so the clean-sample estimate
from pure noise is x0 = sqrt(a_T) x_T - sqrt(1 - a_T) v = -v: the naive one-step use of the teacher is a
well-conditioned map (no division by sqrt(a_T), unlike epsilon-prediction on the default linear schedule).

Deterministic given ``--seed`` (single CPU thread by default). Writes to ``--output_dir``:
``model_index.json``, ``unet/`` and ``scheduler/`` (``DDPMPipeline.save_pretrained``, safetensors, EMA
weights), ``training_log.json`` (loss curve and settings) and ``samples_<sampler>.png`` (a grid sampled
with a few-step solver to eyeball quality).

    python -m fd_onestep.demos.digits.train_teacher --output_dir fd_onestep/demos/digits/assets/teacher
    python -m fd_onestep.demos.digits.train_teacher --class_conditional \
        --output_dir fd_onestep/demos/digits/assets/teacher-class

The training record and the sample grid go to ``--record_dir`` (``results/digits-assets``): ``<name>_training_log.json``, ``<name>_samples_*.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from fd_onestep.demos.digits import DIGITS_RESOLUTION, NULL_CLASS_LABEL, NUM_CLASSES, load_digits_split
from fd_onestep.demos.digits.asset_training import LossLog, asset_script_parser, clipped_step
from fd_onestep.demos.digits.asset_training import start_asset_run, write_training_record


def parse_args(argv=None):
    p = asset_script_parser(__doc__, "DDPMPipeline folder to write.", train_steps=1600)
    p.add_argument("--adam_weight_decay", type=float, default=1e-4)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--beta_schedule", type=str, default="squaredcos_cap_v2")
    p.add_argument("--num_train_timesteps", type=int, default=1000)
    p.add_argument("--sample_steps", type=int, default=20, help="DPM-Solver++ steps for the sample grid.")
    p.add_argument("--logging_steps", type=int, default=50)
    p.add_argument("--class_conditional", action="store_true",
                   help="Class embeddings for digits 0-9 plus the null class 10 (classifier-free guidance).")
    p.add_argument("--class_dropout_prob", type=float, default=0.1,
                   help="--class_conditional: share of training labels replaced by the null class.")
    return p.parse_args(argv)


def build_unet(block_out_channels, layers_per_block, num_class_embeds=None) -> UNet2DModel:
    n = len(block_out_channels)
    # Self-attention only at the coarsest level (4x4 tokens): cheap on CPU, global context for the digit shape.
    down = ("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",)
    up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1)
    return UNet2DModel(
        sample_size=DIGITS_RESOLUTION,
        in_channels=1,
        out_channels=1,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=8,
        attention_head_dim=32,
        num_class_embeds=num_class_embeds,
    )


def build_scheduler(args) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
    )


def main(argv=None):
    args = parse_args(argv)
    output_dir, record_dir = start_asset_run(args)

    images, labels = load_digits_split("train")  # (1437, 1, 16, 16) in [-1, 1], (1437,) int64
    if not 0.0 <= args.class_dropout_prob < 1.0:
        raise ValueError(f"--class_dropout_prob must be in [0, 1), got {args.class_dropout_prob}.")
    num_class_embeds = NUM_CLASSES + 1 if args.class_conditional else None  # + the null class
    unet = build_unet(args.block_out_channels, args.layers_per_block, num_class_embeds)
    scheduler = build_scheduler(args)
    if float(scheduler.alphas_cumprod[-1]) != 0.0:
        raise RuntimeError("zero-terminal-SNR betas expected alphas_cumprod[T] == 0; check the diffusers version.")

    ema = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=UNet2DModel, model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, args.lr_warmup_steps, args.train_steps)
    generator = torch.Generator().manual_seed(args.seed)

    num_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DModel: {num_params / 1e6:.2f}M parameters; {len(images)} training images", flush=True)
    log = LossLog(args.logging_steps, args.train_steps)
    perm, cursor = torch.randperm(len(images), generator=generator), 0
    unet.train()
    for step in tqdm(range(1, args.train_steps + 1), desc="teacher", mininterval=10):
        if cursor + args.train_batch_size > len(images):
            perm, cursor = torch.randperm(len(images), generator=generator), 0
        rows = perm[cursor : cursor + args.train_batch_size]
        x0 = images[rows]
        cursor += args.train_batch_size
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        class_labels = None
        if args.class_conditional:
            dropped = torch.rand(x0.shape[0], generator=generator) < args.class_dropout_prob
            class_labels = torch.where(dropped, NULL_CLASS_LABEL, labels[rows])
        loss = F.mse_loss(unet(x_t, t, class_labels=class_labels).sample, target)
        clipped_step(loss, unet.parameters(), optimizer, lr_scheduler, args.max_grad_norm)
        ema.step(unet.parameters())
        entry = log.add(step, loss, lr=lr_scheduler.get_last_lr()[0])
        if entry:
            print(f"step {step} loss {entry['loss']:.4f} lr {entry['lr']:.2e} {entry['time_s']:.0f}s", flush=True)
    train_time = time.time() - log.start

    ema.copy_to(unet.parameters())
    unet.eval()
    pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.save_pretrained(output_dir, safe_serialization=True)

    # Eyeball check with a few-step solver built from the teacher's own scheduler config (class-conditional:
    # one row per digit, no guidance).
    from fd_onestep.comparison import teacher_sampler

    sample = teacher_sampler(pipeline, args.sample_steps, "dpmsolver++",
                             null_class_label=NULL_CLASS_LABEL if args.class_conditional else None)
    grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(10) if args.class_conditional else None
    samples = sample(100, torch.Generator().manual_seed(args.seed), grid_labels)  # [-1, 1]
    grid_path = record_dir / f"{output_dir.name}_samples_dpmsolver{args.sample_steps}.png"
    save_image(make_grid(samples * 0.5 + 0.5, nrow=10, padding=1, pad_value=0.5), grid_path)

    write_training_record(record_dir, output_dir, log, train_time, grid_path, command_args=vars(args),
                          num_parameters=num_params,
                          null_class_label=NULL_CLASS_LABEL if args.class_conditional else None)


if __name__ == "__main__":
    main()
