#!/usr/bin/env python
"""How close the surrogate decoder gradient is to the exact one on the digits-text demo: the cosine between the
FD-loss gradients w.r.t. the LoRA parameters with the full decode and with ``--surrogate_decoder`` (the bundled
tiny decoder), on the same batches, for the untrained LoRA (B = 0, where the LoRA's A matrices get no gradient)
and for a LoRA with random B (a student mid-training).

    python benchmarks/surrogate_gradient_agreement.py [--batches 5] [--output results/surrogate_gradient_agreement.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fd_onestep.demos import digits
from fd_onestep.losses import FDLoss, MultiEncoderFDLoss
from fd_onestep.memory_savers import DecodeSavers, load_surrogate_decoder
from fd_onestep.onestep import OneStepGenerator
from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline
from fd_onestep.populations import build_population

TEXT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]  # the digits-text default's


def gradients(gen, denoiser, encoders, fd_loss, noise, cond, params):
    images = gen(denoiser, noise, cond)
    feats = {n: e(images.clamp(-1, 1)) for n, e in encoders.items()}
    loss, _ = fd_loss(feats, update=False)
    return torch.autograd.grad(loss, params)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    pipe = FDOneStepPipeline.from_teacher(str(digits.TEXT_TEACHER_PATH), timestep=600, output_bound="clamp")
    prompts = digits.digit_prompts(list(range(10)) * 5)
    exact = OneStepGenerator(pipe, prompts=prompts)
    tiny = load_surrogate_decoder(str(digits.TEXT_TEACHER_TINY_DECODER_PATH))
    surrogate = OneStepGenerator(pipe, prompts=prompts, decode_savers=DecodeSavers(surrogate=tiny))
    denoiser = exact.add_lora(rank=16, target_modules=TEXT_LORA_TARGETS)
    names = [n for n in digits.TRAINING_ENCODERS]
    encoders = digits.load_bundled_encoders(names)
    refs = digits.load_bundled_references(names)
    # the population is the batch itself (beta 0): the loss is the batch's FD to the reference
    fd_loss = MultiEncoderFDLoss({n: FDLoss(refs[n], build_population("ema", refs[n].feature_dim, beta=0.0))
                                  for n in names}, weights=dict(zip(names, [1.0, 1.0, 2.0])))
    params = [q for q in denoiser.parameters() if q.requires_grad]
    rows = {}
    for state in ("untrained LoRA (B = 0)", "LoRA with random B"):
        if state != "untrained LoRA (B = 0)":
            with torch.no_grad():
                for name, q in denoiser.named_parameters():
                    if q.requires_grad and "lora_B" in name:
                        q.normal_(0, 0.02)
        cosines, norm_ratios = [], []
        g = torch.Generator().manual_seed(1)
        for _ in range(args.batches):
            noise = exact.sample_noise(args.batch_size, generator=g)
            cond = exact.sample_conditioning(args.batch_size, generator=g)
            ge = torch.cat([x.flatten() for x in gradients(exact, denoiser, encoders, fd_loss, noise, cond, params)])
            gs = torch.cat([x.flatten() for x in gradients(surrogate, denoiser, encoders, fd_loss, noise, cond, params)])
            cosines.append(float(torch.nn.functional.cosine_similarity(ge, gs, dim=0)))
            norm_ratios.append(float(gs.norm() / ge.norm()))
        rows[state] = {"cosine": cosines, "norm_ratio": norm_ratios}
        print(f"{state}: cosine(exact, surrogate) per batch {', '.join(f'{c:.3f}' for c in cosines)}; "
              f"|surrogate| / |exact| {', '.join(f'{r:.2f}' for r in norm_ratios)}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"batch_size": args.batch_size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
