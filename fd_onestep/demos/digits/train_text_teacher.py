#!/usr/bin/env python
"""Train the bundled text-conditional digits teacher: a stock ``StableDiffusionPipeline`` on scikit-learn's digits.

Four components, each a stock diffusers / transformers class, trained here from scratch on the digits train split:

1. ``CLIPTokenizer``: a byte-pair vocabulary learned (``tokenizers``' ``BpeTrainer``, CLIP's ``</w>`` word ends)
   from the training prompts, so every digit name and numeral is one token;
2. ``AutoencoderKL``: 16x16 gray digits <-> 8x8x4 latents (reconstruction + a small KL term), its
   ``scaling_factor`` set so the latents have unit standard deviation, as Stable Diffusion's (the diffusion
   model learns the posterior means: the sampled latents' noise would be most of their variance here);
3. ``CLIPTextModel`` (2 layers, width 32) and 4. ``UNet2DConditionModel`` (cross-attention on the text), trained
   together with the denoising loss: v-prediction on zero-terminal-SNR betas (``DDPMScheduler(prediction_type=
   "v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")``, the pixel teachers' schedule).
   Each image's prompt names its digit in one of ``fd_onestep.demos.digits.TRAINING_PHRASINGS``; with probability
   ``--prompt_dropout_prob`` the prompt is "" (the stock pipelines' negative prompt), so classifier-free
   guidance works. ``HELD_OUT_PHRASINGS`` are never seen.

The prompts are encoded exactly as ``StableDiffusionPipeline.encode_prompt`` encodes them (padding to the
tokenizer's ``model_max_length``, the last hidden state). Writes ``--output_dir`` with
``StableDiffusionPipeline.save_pretrained`` (safetensors; no safety checker), and in ``--record_dir``
``<name>_training_log.json`` and ``<name>_samples_dpmsolver20.png`` (one row per digit, the stock pipeline with
DPM-Solver++ 20 steps).

    python -m fd_onestep.demos.digits.train_text_teacher --output_dir fd_onestep/demos/digits/assets/teacher-text
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fd_onestep.demos.digits import DIGITS_RESOLUTION, NUM_CLASSES, TRAINING_PHRASINGS, digit_prompt, digit_prompts, load_digits_split
from fd_onestep.demos.digits.asset_training import LossLog, asset_script_parser, clipped_step
from fd_onestep.demos.digits.asset_training import start_asset_run, write_training_record


def parse_args(argv=None):
    # --train_steps: UNet + text encoder steps
    p = asset_script_parser(__doc__, "StableDiffusionPipeline folder to write.", train_steps=3000, learning_rate=1e-3,
                            num_threads=2)
    p.add_argument("--vae_steps", type=int, default=2000)
    p.add_argument("--vae_learning_rate", type=float, default=1e-3)
    p.add_argument("--vae_kl_weight", type=float, default=1e-4)
    p.add_argument("--adam_weight_decay", type=float, default=1e-4)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--prompt_dropout_prob", type=float, default=0.1)
    p.add_argument("--num_train_timesteps", type=int, default=1000)
    p.add_argument("--sample_steps", type=int, default=20)
    p.add_argument("--logging_steps", type=int, default=100)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ components
def build_tokenizer(prompts: list[str], folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges are learned from ``prompts`` (saved to ``folder``, then loaded back)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789"))
    trainer = trainers.BpeTrainer(special_tokens=["<|startoftext|>", "<|endoftext|>"], initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", vocab_size=200, show_progress=False)
    bpe.train_from_iterator(prompts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(folder))  # vocab.json + merges.txt (after a "#version" line)
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split(" ")) for line in (folder / "merges.txt").read_text().splitlines()[1:] if line]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 8  # "<start> the handwritten number 7 <end>" and padding
    return tokenizer


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, sample_size=DIGITS_RESOLUTION,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
    )


def build_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    # cross-attention on the text at the coarse 4x4 level and in the middle block (the pixel teachers' layout)
    return UNet2DConditionModel(
        sample_size=DIGITS_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8,
    )


def build_scheduler(args) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                         clip_sample=False, steps_offset=1)  # StableDiffusionPipeline rewrites any other offset to 1


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """(B, L, width) prompt embeddings, as StableDiffusionPipeline.encode_prompt makes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


# ------------------------------------------------------------------------------------------------ training
def train_vae(args, vae, images, generator) -> list:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, args.lr_warmup_steps, args.vae_steps)
    log = LossLog(args.logging_steps, args.vae_steps)
    vae.train()
    for step in tqdm(range(1, args.vae_steps + 1), desc="vae", mininterval=10):
        x = images[torch.randint(len(images), (args.train_batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + args.vae_kl_weight * posterior.kl().mean()
        clipped_step(loss, vae.parameters(), optimizer, lr_scheduler, args.max_grad_norm)
        log.add(step, loss)
    vae.eval().requires_grad_(False)
    return log.entries


def main(argv=None):
    args = parse_args(argv)
    output_dir, record_dir = start_asset_run(args)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_split("train")  # (1437, 1, 16, 16) in [-1, 1], (1437,)
    start = time.time()

    # 1. tokenizer: every training prompt of every digit
    corpus = [digit_prompt(c, phrasing) for c in range(NUM_CLASSES) for phrasing in TRAINING_PHRASINGS]
    tokenizer = build_tokenizer(corpus, output_dir / "tokenizer")

    # 2. VAE, then the latent scale
    vae = build_vae()
    vae_log = train_vae(args, vae, images, generator)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
        recon_mse = float(F.mse_loss(vae.decode(latents).sample, images))
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae_seconds = time.time() - start

    # 3 + 4. text encoder and UNet, with the denoising loss
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet(text_encoder.config.hidden_size)
    scheduler = build_scheduler(args)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, args.lr_warmup_steps, args.train_steps)
    ema_unet = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config)
    ema_text = EMAModel(text_encoder.parameters(), decay=args.ema_decay)
    log = LossLog(args.logging_steps, args.train_steps, start)
    unet.train()
    text_encoder.train()
    for step in tqdm(range(1, args.train_steps + 1), desc="unet + text encoder", mininterval=10):
        rows = torch.randint(len(images), (args.train_batch_size,), generator=generator)
        x0 = latents[rows] * vae.config.scaling_factor
        prompts = digit_prompts(labels[rows], TRAINING_PHRASINGS, generator)
        dropped = torch.rand(len(prompts), generator=generator) < args.prompt_dropout_prob
        prompts = ["" if d else p for p, d in zip(prompts, dropped.tolist())]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
        target = scheduler.get_velocity(x0, noise, t)
        prediction = unet(scheduler.add_noise(x0, noise, t), t, encode_prompts(tokenizer, text_encoder, prompts)).sample
        loss = F.mse_loss(prediction, target)
        clipped_step(loss, params, optimizer, lr_scheduler, args.max_grad_norm)
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        entry = log.add(step, loss)
        if entry:
            print(f"step {step} loss {entry['loss']:.4f} {entry['time_s']:.0f}s", flush=True)
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    unet.eval()
    text_encoder.eval()
    train_seconds = time.time() - start

    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(output_dir, safe_serialization=True)

    # Eyeball check: the stock pipeline with DPM-Solver++, one row per digit (a training phrasing).
    sampler = StableDiffusionPipeline.from_pretrained(output_dir, local_files_only=True)
    sampler.scheduler = DPMSolverMultistepScheduler.from_config(sampler.scheduler.config)
    sampler.set_progress_bar_config(disable=True)
    grid_prompts = [digit_prompt(c, "the digit {word}") for c in range(NUM_CLASSES) for _ in range(10)]
    with torch.no_grad():
        samples = sampler(grid_prompts, num_inference_steps=args.sample_steps, guidance_scale=1.0,
                          generator=torch.Generator().manual_seed(args.seed), output_type="pt").images
    grid_path = record_dir / f"{output_dir.name}_samples_dpmsolver{args.sample_steps}.png"
    save_image(make_grid(samples, nrow=10, padding=1, pad_value=0.5), grid_path)

    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    write_training_record(
        record_dir, output_dir, log, train_seconds, grid_path, command_args=vars(args),
        num_parameters={"unet": count(unet), "text_encoder": count(text_encoder), "vae": count(vae)},
        vocab_size=len(tokenizer),
        vae={"train_time_s": round(vae_seconds, 1), "final_loss": vae_log[-1]["loss"],
             "reconstruction_mse_train": recon_mse, "scaling_factor": vae.config.scaling_factor, "loss_curve": vae_log},
    )


if __name__ == "__main__":
    main()
