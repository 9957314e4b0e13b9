#!/usr/bin/env python
"""The README's real-size table: ``fd-onestep plan`` for every bundled real config at its native resolution.

    python benchmarks/real_size_table.py [--output results/real_size_plans.json] [--teachers sdxl ...]

Per family: LoRA (rank 8) and full fine-tune, without and with the memory savers (denoiser and VAE gradient
checkpointing, decoding one latent at a time, and the surrogate decoder gradient where a published tiny decoder
exists), the default FD encoders (inception, dinov2), bf16 mixed precision: memory per GPU at batch 1 and 8, the
largest batch on an 80 GB GPU, and per GPU at batch 1 sharded over 8 GPUs (``fd-onestep plan --fsdp --num_gpus 8``:
FSDP2, text encoders off the GPU; the same plan, docs/several_gpus.md). Then, for SDXL LoRA at 1024 px, what each saver buys alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fd_onestep.plan import REAL_CONFIGS_DIR, PlanSettings, list_real_configs, make_plan, real_config_index


def savers_for(name: str) -> dict:
    import diffusers

    tiny = real_config_index()["tiny_decoder_of"].get(name)
    vae = json.loads((REAL_CONFIGS_DIR / name / "model_index.json").read_text()).get("vae")
    savers = {"gradient_checkpointing": True}
    if vae is None:  # a pixel-space teacher (DDPMPipeline): no decode to save on
        return savers
    savers["decode_micro_batch_size"] = 1
    if getattr(diffusers, vae[1])._supports_gradient_checkpointing:  # not AutoencoderDC (SANA)
        savers["vae_gradient_checkpointing"] = True
    if tiny:
        savers["surrogate_decoder"] = tiny
    return savers


def run(name: str, lora: bool, savers: dict) -> dict:
    start = time.perf_counter()
    # batch 8 is planned directly: the peak can move between parts as the batch grows (docs/plan.md)
    plan = make_plan(PlanSettings(teacher=name, use_lora=lora, batch_size=8, fsdp=True, num_gpus=8, **savers),
                     batches=[1, 2, 8])
    return {"teacher": name, "lora": lora, "savers": plan.settings.savers, "resolution": plan.resolution,
            "family": plan.family, "peak_b1": plan.peak(1), "peak_b8": plan.peak(8), "max_batch_80gb": plan.max_batch(),
            "sharded_8gpu_b1": plan.sharded_per_gpu(8, 1),
            "weights": plan.weights, "trainable_params": plan.trainable_params,
            "saved_b1": plan.steps[1].saved, "flops_per_sample": plan.flops_per_sample(),
            "step_time_b8_s": plan.step_time(8), "plan_seconds": time.perf_counter() - start}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", nargs="+", default=list_real_configs())
    p.add_argument("--output", default=None)
    p.add_argument("--skip_per_saver", action="store_true", help="Skip the SDXL per-saver rows.")
    p.add_argument("--trainings", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    args = p.parse_args()
    load_before = os.getloadavg()
    rows = []
    for name in args.teachers:
        for lora in [t == "lora" for t in args.trainings]:
            for savers in ({}, savers_for(name)):
                try:
                    rows.append(run(name, lora, savers))
                except Exception as err:  # a family the installed pipeline does not support yet: say so
                    rows.append({"teacher": name, "lora": lora, "savers": list(savers), "error": f"{type(err).__name__}: {err}"})
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("weights", "saved_b1", "flops_per_sample")}), flush=True)
    per_saver = []
    if "sdxl" in args.teachers and not args.skip_per_saver:
        for saver in ({"gradient_checkpointing": True}, {"vae_gradient_checkpointing": True},
                      {"decode_micro_batch_size": 1}, {"surrogate_decoder": "taesdxl"}):
            per_saver.append(run("sdxl", True, saver))
            print(json.dumps({k: v for k, v in per_saver[-1].items() if k not in ("weights", "saved_b1", "flops_per_sample")}), flush=True)
    print()
    print("| teacher | px | training | memory savers | GB per GPU, batch 1 | batch 8 | largest batch on 80 GB | "
          "GB per GPU, batch 1, sharded over 8 GPUs |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        savers = "all" if r["savers"] else "none"
        if "error" in r:
            print(f"| {r['teacher']} | | {'LoRA' if r['lora'] else 'full'} | {savers} | not planned: {r['error'][:80]} | | | |")
            continue
        print(f"| {r['teacher']} | {r['resolution']} | {'LoRA' if r['lora'] else 'full'} | {savers} | "
              f"{r['peak_b1'] / 1e9:.1f} | {r['peak_b8'] / 1e9:.1f} | {r['max_batch_80gb']} | "
              f"{r['sharded_8gpu_b1'] / 1e9:.1f} |")
    if per_saver:
        print()
        print("| SDXL 1024 px LoRA, one saver | GB per GPU, batch 8 | largest batch on 80 GB |")
        print("|---|---:|---:|")
        for r in per_saver:
            print(f"| {' '.join(r['savers'])} | {r['peak_b8'] / 1e9:.1f} | {r['max_batch_80gb']} |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        record = {"produced_by": "python benchmarks/real_size_table.py " + " ".join(sys.argv[1:]),
                  "settings": "bf16, encoders inception + dinov2, LoRA rank 8, batches 1, 2 and 8 planned, 80 GB",
                  "cpu_count": os.cpu_count(), "load_average_before": load_before,
                  "load_average_after": os.getloadavg(), "rows": rows, "sdxl_per_saver": per_saver,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        Path(args.output).write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
