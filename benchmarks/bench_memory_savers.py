#!/usr/bin/env python
"""Memory savers on the digits-text demo: measured step memory and time with each saver on and off, next to
``fd-onestep plan``'s prediction for the same configuration, ratios measured in one run.

    python benchmarks/bench_memory_savers.py [--batch_size 64] [--output results/memory_savers.json]

Each configuration runs the training step's forward and backward (one-step generator, decode, the demo's
training encoders; gradients pre-allocated) on real CPU tensors, in a fresh process per configuration: memory is
the peak the CPU allocator handed out during the step (the torch profiler's memory events; what a GPU's allocator
would be asked for), with the step's peak resident memory beside it (Linux; it adds the process's own overheads),
time a plain step without the counters. The plan runs the same step on fake tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from fd_onestep.demos import digits
from fd_onestep.plan import PlanSettings, make_plan, real_step_in_subprocess

CONFIGS = {
    "none": {},
    "--vae_gradient_checkpointing": {"vae_gradient_checkpointing": True},
    "--decode_micro_batch_size 16": {"decode_micro_batch_size": 16},
    "--surrogate_decoder (bundled tiny decoder)": {"surrogate_decoder": str(digits.TEXT_TEACHER_TINY_DECODER_PATH)},
    "--gradient_checkpointing": {"gradient_checkpointing": True},
    "all four": {"vae_gradient_checkpointing": True, "decode_micro_batch_size": 16, "gradient_checkpointing": True,
                 "surrogate_decoder": str(digits.TEXT_TEACHER_TINY_DECODER_PATH)},
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--output", default=None, help="Write the record as JSON here.")
    args = p.parse_args()
    b = args.batch_size
    encoders = [digits.encoder_spec(n) for n in digits.TRAINING_ENCODERS if n != "pixels-digits"]
    load_before = os.getloadavg()
    rows = {}
    for name, saver in CONFIGS.items():
        settings = PlanSettings(teacher=str(digits.TEXT_TEACHER_PATH), encoders=encoders, mixed_precision="no",
                                use_lora=True, lora_rank=16, batch_size=b, **saver)
        planned = make_plan(settings, batches=[b]).steps[b]
        real = real_step_in_subprocess(settings, b)  # a fresh process per configuration
        rows[name] = {"planned_bytes": planned.transient_peak, "measured_bytes": real.allocated_peak,
                      "resident_bytes": real.rss_delta,
                      "seconds": real.seconds, "saved_bytes": planned.saved,
                      "planned_flops": sum(planned.flops.values()), "measured_flops": sum(real.flops.values())}
    base = rows["none"]
    print(f"digits-text demo, batch {b}, float32, LoRA r16; CPU: {os.cpu_count()} cores, load average "
          f"{load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after")
    print("| savers | step memory, measured | planned | planned / measured | measured / none | planned / none | "
          "resident memory | step time | time / none |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['measured_bytes'] / 1e6:.1f} MB | {r['planned_bytes'] / 1e6:.1f} MB | "
              f"{r['planned_bytes'] / r['measured_bytes']:.2f} | {r['measured_bytes'] / base['measured_bytes']:.2f} | "
              f"{r['planned_bytes'] / base['planned_bytes']:.2f} | {r['resident_bytes'] / 1e6:.1f} MB | "
              f"{r['seconds']:.3f} s | {r['seconds'] / base['seconds']:.2f} |")
    if args.output:
        record = {"benchmark": "bench_memory_savers", "batch_size": b, "rows": rows, "cpu_count": os.cpu_count(),
                  "load_average_before": load_before, "load_average_after": os.getloadavg(),
                  "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
        print(f"saved {args.output}")


if __name__ == "__main__":
    main()
