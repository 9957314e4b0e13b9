"""Worker of tests/test_sharded_training.py: train tiny teachers with the library's training-step code, sharded.

Run by ``accelerate launch`` (1 process: plain; 2 gloo processes with ``--use_fsdp --fsdp_version 2``: FSDP2
through ``enable_fsdp2``, the route a GPU run takes). For every requested run (family x full / LoRA) it trains
STEPS steps (2 processes: with an atomic sharded checkpoint at step STOP), then (2 processes) resumes in fresh
objects from that checkpoint to STEPS, and writes under ``out/<run>/{straight,resumed}/``: the gathered final
weights (``weights.safetensors``; the LoRA's for LoRA, and its diffusers LoRA file under ``lora/``), the gathered
EMA of the weights (``ema.safetensors``), per process the local shard sizes after the first step
(``shards-<rank>.json``), and with 1 process the weights before training (``initial.safetensors``). The same
functions as the trainer: ``OneStepGenerator`` (noise, conditioning, one-step forward), an FD-loss over an EMA
population (the multi-process FD gradient), diffusers' ``EMAModel``, ``accelerator.prepare`` /
``save_checkpoint_atomically`` / ``load_state``.

usage: sharded_training_worker.py OUT RUN [RUN ...]   (RUN: flux, flux-lora, digits, digits-lora; the test runs the first three)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS, STOP, GLOBAL_BATCH, FEATURE_DIM = 4, 2, 8, 6
PROMPTS = ["a red square", "a blue circle", "a green cat", "two cats"]


def build_generator(family: str, lora: bool, device):
    import inspect

    from tiny_teachers import FAMILY_KWARGS, TEACHERS

    from fd_onestep import FDOneStepPipeline, OneStepGenerator

    torch.manual_seed(0)
    if family == "digits":  # the bundled digits UNet (UNet2DModel, 16x16)
        from fd_onestep.demos.digits import load_digits_teacher

        teacher = load_digits_teacher()
    else:
        teacher = TEACHERS[family]()
    accepted = set(inspect.signature(FDOneStepPipeline.__init__).parameters)
    pipe = FDOneStepPipeline(**{k: v for k, v in teacher.components.items() if k in accepted},
                             **FAMILY_KWARGS.get(family, {}))
    gen = OneStepGenerator(pipe, prompts=PROMPTS if pipe.is_text_conditional else None, device=device)
    if lora:
        torch.manual_seed(1)
        gen.add_lora(rank=4)
        with torch.no_grad():  # PEFT starts B at zero: make the adapter's output non-zero from step 1
            for name, p in gen.denoiser.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    gen.denoiser.train()
    return gen


class Encoder(torch.nn.Module):
    """A frozen stand-in feature encoder: 4x4 average pool of the images, a fixed linear map to FEATURE_DIM."""

    def __init__(self, channels: int):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.proj = torch.nn.Parameter(torch.randn(channels * 16, FEATURE_DIM, generator=g) / 8, requires_grad=False)

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1) @ self.proj


def train(accelerator, family, lora, out: Path, checkpoint_at=None, resume_from=None):
    from diffusers.training_utils import EMAModel

    from fd_onestep.losses import FDLoss
    from fd_onestep.populations import build_population
    from fd_onestep.reference_stats import ReferenceStats
    from fd_onestep.training.checkpoints import save_checkpoint_atomically
    from fd_onestep.training.sharding import (enable_fsdp2, full_state_dict, is_sharded, load_sharded_state,
                                              local_shard_numels, save_sharded_state, sharded_lora_state_dict)
    from fd_onestep.training.state import CheckpointableGenerator, load_state_file, save_state_file

    device = accelerator.device
    gen = build_generator(family, lora, device)
    denoiser = gen.denoiser
    sharded = enable_fsdp2(accelerator, denoiser)
    # the trainable parameters are read after prepare: fully_shard replaces them with sharded ones
    # SGD with momentum, not AdamW: Adam's first step is lr * sign(g), so the sign of a gradient element that is
    # round-off sized flips between batch shapes (8 rows on one process, 4 on each of two) and moves that weight
    # by 2 lr, a property of Adam, not of sharding; SGD carries float32 round-off through linearly
    optimizer = torch.optim.SGD([p for p in denoiser.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    denoiser, optimizer, scheduler = accelerator.prepare(denoiser, optimizer, scheduler)
    assert is_sharded(denoiser) == sharded
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    ema = EMAModel(trainable, decay=0.7)

    encoder = Encoder(gen.image_shape[0]).to(device)
    g = torch.Generator().manual_seed(3)
    reference = ReferenceStats.from_features(torch.randn(200, FEATURE_DIM, generator=g, dtype=torch.float64) + 0.3,
                                             encoder_id="stand-in")
    fd_loss = FDLoss(reference, build_population("ema", FEATURE_DIM, beta=0.5, device=device))
    rng = CheckpointableGenerator(seed=11)
    progress = {"step": 0}

    def save_hook(models, weights, ckpt_dir):
        save_sharded_state(ema.state_dict(), Path(ckpt_dir) / "generator_ema")  # every process: its shards
        if accelerator.is_main_process:
            save_state_file({"population": fd_loss.population.state_dict(), "rng": rng.state_dict(),
                             "step": progress["step"]}, Path(ckpt_dir) / "training_state.safetensors")

    def load_hook(models, ckpt_dir):
        ema.load_state_dict(load_sharded_state(ema.state_dict(), Path(ckpt_dir) / "generator_ema"))
        state = load_state_file(Path(ckpt_dir) / "training_state.safetensors")
        fd_loss.population.load_state_dict(state["population"])
        rng.load_state_dict(state["rng"])
        progress["step"] = state["step"]

    hooks = [accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)]
    try:
        _loop(accelerator, gen, denoiser, optimizer, scheduler, ema, trainable, encoder, fd_loss, rng, progress, out,
              lora, checkpoint_at, resume_from)
        if sharded and resume_from is None:
            check_run_on_main_process(accelerator, gen, denoiser, out)
    finally:
        for hook in hooks:
            hook.remove()
        accelerator.free_memory()


def _loop(accelerator, gen, denoiser, optimizer, scheduler, ema, trainable, encoder, fd_loss, rng, progress, out, lora,
          checkpoint_at, resume_from):
    from fd_onestep.training.checkpoints import save_checkpoint_atomically
    from fd_onestep.training.sharding import full_state_dict, local_shard_numels, sharded_lora_state_dict

    initial = sharded_lora_state_dict(denoiser) if lora else full_state_dict(denoiser)
    initial = {k: v.detach().clone() for k, v in initial.items()}
    if resume_from is not None:
        accelerator.load_state(str(resume_from))

    rank = accelerator.process_index
    while progress["step"] < STEPS:
        noise = gen.sample_noise(GLOBAL_BATCH, generator=rng.generator)
        cond = gen.sample_conditioning(GLOBAL_BATCH, generator=rng.generator)
        with accelerator.split_between_processes(list(range(GLOBAL_BATCH))) as rows:
            start, end = rows[0], rows[-1] + 1
        fd_loss.begin_step()
        images = gen(denoiser, noise[start:end], cond[start:end] if cond is not None else None)
        loss = fd_loss(encoder(images.float()).double())
        accelerator.backward(loss)
        fd_loss.end_step()
        if progress["step"] == 0 and resume_from is None:
            (out / f"shards-{rank}.json").write_text(json.dumps(local_shard_numels(denoiser, None)))
        optimizer.step()
        scheduler.step()
        if progress["step"] == 0 and resume_from is None:
            shards = json.loads((out / f"shards-{rank}.json").read_text())
            shards["optimizer_state"] = local_shard_numels(denoiser, optimizer)["optimizer_state"]
            (out / f"shards-{rank}.json").write_text(json.dumps(shards))
        optimizer.zero_grad(set_to_none=True)
        ema.step(trainable)
        progress["step"] += 1
        if progress["step"] == checkpoint_at:
            save_checkpoint_atomically(accelerator, out, progress["step"])

    weights = sharded_lora_state_dict(denoiser) if lora else full_state_dict(denoiser)
    ema_full = {f"shadow.{i}": (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().contiguous()
                for i, t in enumerate(ema.shadow_params)}
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        if accelerator.num_processes == 1 and resume_from is None:
            save_file({k: v.contiguous() for k, v in initial.items()}, str(out / "initial.safetensors"))

        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "weights.safetensors"))
        save_file(ema_full, str(out / "ema.safetensors"))
        if lora:
            from fd_onestep.training.sharding import _plain_module

            gen.pipeline.save_lora_weights(out / "lora", denoiser_lora_layers=weights, family=gen.family,
                                           lora_config=_plain_module(denoiser).peft_config["default"])
    accelerator.wait_for_everyone()


def check_run_on_main_process(accelerator, gen, denoiser, out: Path):
    """``run_on_main_process``: the main process alone calls the sharded denoiser (the other joins each forward) and
    gets what every process computes together; an exception there is raised on every process. Written to
    ``main_process-<rank>.json``."""
    from fd_onestep.training.sharding import run_on_main_process

    noise = gen.sample_noise(2, generator=torch.Generator().manual_seed(0), device=accelerator.device)
    cond = gen.sample_conditioning(2, generator=torch.Generator().manual_seed(0), device=accelerator.device)
    with torch.no_grad():
        together = gen(denoiser, noise, cond)
    alone = run_on_main_process(accelerator, denoiser, lambda model: gen(model, noise, cond))
    record = {"same_images": None if alone is None else bool(torch.equal(alone, together))}
    try:
        run_on_main_process(accelerator, denoiser, lambda model: (gen(model, noise, cond), 1 / 0))
    except (ZeroDivisionError, RuntimeError) as err:
        record["raised"] = type(err).__name__
    (out / f"main_process-{accelerator.process_index}.json").write_text(json.dumps(record))


def main():
    from accelerate import Accelerator

    out_root, runs = Path(sys.argv[1]), sys.argv[2:]
    accelerator = Accelerator(cpu=True)
    torch.use_deterministic_algorithms(True)
    for run in runs:
        family, lora = run.split("-")[0], run.endswith("-lora")
        straight, resumed = out_root / run / "straight", out_root / run / "resumed"
        for folder in (straight, resumed):
            folder.mkdir(parents=True, exist_ok=True)
        if accelerator.num_processes == 1:
            train(accelerator, family, lora, straight)
        else:  # the uninterrupted run checkpoints at STOP; a fresh run resumes from that checkpoint
            train(accelerator, family, lora, straight, checkpoint_at=STOP)
            train(accelerator, family, lora, resumed, resume_from=straight / f"checkpoint-{STOP}")


if __name__ == "__main__":
    main()
