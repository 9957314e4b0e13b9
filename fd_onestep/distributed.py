"""Small ``torch.distributed`` helpers for the FD populations.

Every helper is a no-op (or the identity) when ``torch.distributed`` is not available, not initialized,
or the world has a single process, so the same code runs in a plain script, under
``accelerate launch`` with one process, and under DDP with many.

Devices: a collective runs on the device of the tensors it is handed. ``accelerate launch --multi_gpu``
starts an NCCL process group, which takes CUDA tensors only, so every tensor reduced here must live on
the process's device (``accelerator.device``): the populations and moments are created there (their
``device=`` argument) and follow the device of their features. A CPU tensor handed to an NCCL group is
refused here with the fix, instead of NCCL's own error.
"""

from __future__ import annotations

import torch

__all__ = [
    "get_rank",
    "get_world_size",
    "is_distributed",
    "all_reduce_sum",
    "all_gather_cat",
    "check_collective_device",
    "sum_over_processes_with_local_grad",
    "with_local_grad",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialized with more than one process."""
    return get_world_size() > 1


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_world_size() -> int:
    """Number of processes of the default process group (1 when not distributed)."""
    return torch.distributed.get_world_size() if _initialized() else 1


def get_rank() -> int:
    """Rank of this process in the default process group (0 when not distributed)."""
    return torch.distributed.get_rank() if _initialized() else 0


def _backend() -> str:
    return str(torch.distributed.get_backend())


def check_collective_device(tensor: torch.Tensor) -> None:
    """Raise ``RuntimeError`` when ``tensor`` cannot take part in a collective of the default group.

    NCCL (the backend of ``accelerate launch --multi_gpu``) reduces CUDA tensors only; gloo takes both.
    """
    if _backend() == "nccl" and tensor.device.type != "cuda":
        raise RuntimeError(
            f"a {tensor.device} tensor was handed to an NCCL collective, which takes CUDA tensors only: create "
            "the FD populations / FeatureMoments on the process's device (device=accelerator.device) or feed "
            "them features computed there."
        )


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes; returns a new detached tensor (the input is not modified).

    Identity (a detached copy) when not distributed. Runs on the device of ``tensor`` (see the module
    docstring).
    """
    out = tensor.detach().clone()
    if is_distributed():
        check_collective_device(out)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (B_r, ...) from every process along dim 0, in rank order (detached).

    Processes may hold different B_r (e.g. the last, smaller batch of an epoch): sizes are exchanged
    first and the rows are padded for the collective, then trimmed.
    """
    tensor = tensor.detach()
    if not is_distributed():
        return tensor.clone()
    check_collective_device(tensor)
    world = get_world_size()
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    max_rows = max(sizes)
    padded = tensor.new_zeros((max_rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    chunks = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(chunks, padded.contiguous())
    return torch.cat([c[:n] for c, n in zip(chunks, sizes)], dim=0)


def with_local_grad(value: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``value + W * (local - sg(local))``: the value of ``value`` (no gradient of its own), the gradient
    of ``W * local``, with W the world size (1 when not distributed).

    ``value`` is a global quantity (e.g. a sum over processes) that ``local`` contributes to. DDP
    averages parameter gradients over the W processes (divides their sum by W), so the factor W makes
    the averaged parameter gradient ``sum_r dL/d(value) * d local_r / d theta``: exactly the
    single-process gradient of the loss of the global batch (without it, W times too small).
    """
    return value + get_world_size() * (local - local.detach())


def sum_over_processes_with_local_grad(local: torch.Tensor) -> torch.Tensor:
    """Global sum of ``local`` over processes whose gradient flows only into this process's ``local``.

    Returns ``sg(sum_r local_r) + W * (local - sg(local))`` (:func:`with_local_grad`): its value is the
    global sum, its gradient with respect to ``local`` is ``W * dL/d(global)``, which DDP's averaging
    turns into the single-process gradient of the global batch.

    Identity (the tensor itself, gradient untouched) when not distributed.
    """
    if get_world_size() == 1:
        return local
    total = all_reduce_sum(local)
    if not local.requires_grad:
        return total
    return with_local_grad(total, local)
