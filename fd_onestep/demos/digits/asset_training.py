"""What the scripts that build the digits demo's assets share (``fd_onestep/demos/digits/train_*.py``, run as
``python -m fd_onestep.demos.digits.train_*``): their common options, one clipped optimizer step, the loss log,
and the training record they leave in ``results/``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RECORD_DIR = "results/digits-assets"


def asset_script_parser(description: str, output_help: str, **defaults) -> argparse.ArgumentParser:
    """``--output_dir --seed --record_dir --train_steps --train_batch_size --learning_rate --lr_warmup_steps
    --num_threads``, with the script's own ``defaults`` for the last five."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", type=str, required=True, help=output_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record_dir", type=str, default=RECORD_DIR,
                   help="where the training record (and sample grid) goes: the run records folder, not the package.")
    p.add_argument("--train_steps", type=int, default=defaults.get("train_steps", 1500))
    p.add_argument("--train_batch_size", type=int, default=defaults.get("train_batch_size", 64))
    p.add_argument("--learning_rate", type=float, default=defaults.get("learning_rate", 2e-3))
    p.add_argument("--lr_warmup_steps", type=int, default=defaults.get("lr_warmup_steps", 100))
    p.add_argument("--num_threads", type=int, default=defaults.get("num_threads", 1),
                   help="torch CPU threads (1 keeps runs deterministic).")
    return p


def start_asset_run(args) -> tuple[Path, Path]:
    """torch's threads and seed from the options; the output and record folders, created."""
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    output_dir, record_dir = Path(args.output_dir), Path(args.record_dir)
    record_dir.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir, record_dir


def clipped_step(loss: torch.Tensor, params, optimizer, lr_scheduler, max_grad_norm: float) -> None:
    """Backward, clip the gradient norm of ``params``, step the optimizer and the schedule, zero the gradients."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class LossLog:
    """The mean loss of every ``every`` steps (and of the last ``total``-th), with the step and the seconds since
    ``start``: the loss curve of a training record."""

    def __init__(self, every: int, total: int, start: float | None = None):
        self.every, self.total = every, total
        self.start = time.time() if start is None else start
        self.entries: list[dict] = []
        self._running: list[float] = []

    def add(self, step: int, loss: torch.Tensor, **extra) -> dict | None:
        """Record one step's loss; returns the new entry when this step closes a logging window."""
        self._running.append(loss.item())
        if step % self.every and step != self.total:
            return None
        entry = {"step": step, "loss": sum(self._running) / len(self._running), **extra,
                 "time_s": time.time() - self.start}
        self._running = []
        self.entries.append(entry)
        return entry


def write_training_record(record_dir: str | Path, output_dir: Path, log: LossLog, train_seconds: float,
                          grid_path: Path | None, **summary) -> Path:
    """``summary`` with the training time and the loss curve as ``<record_dir>/<asset name>_training_log.json``;
    says what was saved."""
    summary.update(train_time_s=round(train_seconds, 1), final_loss=log.entries[-1]["loss"], loss_curve=log.entries)
    path = Path(record_dir) / f"{output_dir.name}_training_log.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    grid = f"; grid {grid_path}" if grid_path is not None else ""
    print(f"saved {output_dir} ({train_seconds:.0f}s, final loss {summary['final_loss']:.4f}){grid}; record {path}",
          flush=True)
    return path
