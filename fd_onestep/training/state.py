"""Extra training state saved with each checkpoint, never pickled: tensors as safetensors, the rest as JSON.

FD populations, the generator EMA, the sampling RNG and the step counter go through :func:`save_state_file`
/ :func:`load_state_file`, so loading a checkpoint never executes code.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "flatten_state",
    "unflatten_state",
    "save_state_file",
    "load_state_file",
    "CheckpointableGenerator",
    "TrainingProgress",
]


def flatten_state(state: Any, prefix: str = "", to_cpu: bool = True) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tensors, JSON scalars) into tensors and a JSON skeleton.

    Returns ``(tensors, skeleton)``: ``tensors`` maps dotted keys to contiguous CPU tensors (``to_cpu=False``:
    the tensors themselves, sharded ones included, for ``torch.distributed.checkpoint``); the skeleton is
    the same structure with each tensor replaced by ``{"__tensor__": key}``. Raises ``TypeError`` for any
    other leaf type (no pickling).
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, key):
        if isinstance(node, torch.Tensor):
            tensors[key] = node.detach().to("cpu").contiguous().clone() if to_cpu else node
            return {"__tensor__": key}
        if isinstance(node, Mapping):
            out = {}
            for k, v in node.items():
                if not isinstance(k, (str, int)):
                    raise TypeError(f"state key {k!r} at {key!r} is not a str or int")
                out[str(k)] = walk(v, f"{key}.{k}" if key else str(k))
            if any(isinstance(k, int) for k in node):
                out = {"__intkeys__": out}
            return out
        if isinstance(node, (list, tuple)):
            return {"__list__": [walk(v, f"{key}.{i}" if key else str(i)) for i, v in enumerate(node)]}
        if isinstance(node, bool) or node is None or isinstance(node, (int, str)):
            return node
        if isinstance(node, float):
            if not math.isfinite(node):
                return {"__float__": repr(node)}
            return node
        raise TypeError(
            f"state entry {key!r} has type {type(node).__name__}; training state must be tensors, dicts, lists "
            "and JSON scalars so that it is saved without pickle."
        )

    skeleton = walk(state, prefix)
    return tensors, skeleton


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_state`."""

    def walk(node):
        if isinstance(node, dict):
            if set(node) == {"__tensor__"}:
                return tensors[node["__tensor__"]]
            if set(node) == {"__list__"}:
                return [walk(v) for v in node["__list__"]]
            if set(node) == {"__float__"}:
                return float(node["__float__"])
            if set(node) == {"__intkeys__"}:
                return {(int(k) if k.lstrip("-").isdigit() else k): walk(v) for k, v in node["__intkeys__"].items()}
            return {k: walk(v) for k, v in node.items()}
        return node

    return walk(skeleton)


def save_state_file(state: Any, path: str | os.PathLike) -> None:
    """Save a nested training state to ``path`` (safetensors; the structure as JSON in its metadata)."""
    from safetensors.torch import save_file

    tensors, skeleton = flatten_state(state)
    save_file(tensors, str(path), metadata={"fd_onestep_state": json.dumps(skeleton)})


def load_state_file(path: str | os.PathLike) -> Any:
    """Load a state written by :func:`save_state_file` (no pickle involved)."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        skeleton = json.loads(f.metadata()["fd_onestep_state"])
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return unflatten_state(tensors, skeleton)


class CheckpointableGenerator:
    """A seeded ``torch.Generator`` for noise / conditioning sampling, with ``state_dict``/``load_state_dict``.

    Every process holds the same generator and draws the *global* batch, then keeps its own slice: the
    samples a run sees then do not depend on the number of processes (N processes with batch b draw exactly
    what one process with batch N*b draws), and resuming restores the stream exactly.
    """

    def __init__(self, seed: int, device: str | torch.device = "cpu"):
        self.seed = int(seed)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng_state": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["rng_state"].to(torch.uint8).cpu())


class TrainingProgress:
    """Step counter and best fresh-sample metric, saved with every checkpoint (no dataloader to count with)."""

    def __init__(self):
        self.global_step = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": int(self.global_step),
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.best_metric = state.get("best_metric")
        self.best_step = state.get("best_step")
        self.history = [dict(h) for h in state.get("history", [])]
