"""Sharded training (FSDP2) of the denoiser, through accelerate, on GPUs and on gloo CPU processes alike.

The route (docs/several_gpus.md):

- ``accelerate launch --config_file configs/accelerate_fsdp2_8gpu.yaml ...`` (or ``--use_fsdp --fsdp_version 2``)
  gives the ``Accelerator`` an FSDP2 plugin. :func:`enable_fsdp2` fills in what the plugin does not know: the
  denoiser's block classes (the family adapter's ``block_classes``, else the model class's own
  ``_no_split_modules``), each block its own FSDP2 unit, and a sharded (``torch.distributed.checkpoint``) state
  dict for checkpoints.
- ``accelerator.prepare(denoiser, optimizer, lr_scheduler)`` then shards with accelerate's own
  ``fsdp2_prepare_model`` (torch's ``fully_shard`` block by block, then the root) and points the optimizer at
  the sharded parameters; ``accelerator.save_state`` / ``load_state`` write and read the model and optimizer
  as sharded ``torch.distributed.checkpoint`` folders (every process its own shards).
- accelerate applies an FSDP configuration only on accelerators: with ``Accelerator(cpu=True)`` and several
  gloo processes it silently falls back to DDP. :func:`enable_fsdp2` sets the accelerator's state there the way
  ``AcceleratorState`` sets it on GPUs (``distributed_type = FSDP``, the plugin), so the CPU tests run the very
  code a GPU run runs (prepare, sharding, save/load state), apart from the device.

What stays exact under sharding: the FD populations hold features and their moments, the same on every process
(their collectives reduce features / moments, never parameters); the multi-process FD gradient's factor W
(:func:`fd_onestep.distributed.with_local_grad`) assumes the parameter gradients are averaged over the W
processes, which FSDP2's reduce-scatter does like DDP's all-reduce; the EMA of the weights is elementwise, so an
EMA over each process's local shards is the EMA of the full weights, saved sharded (:func:`save_sharded_state`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "denoiser_block_classes",
    "fsdp2_requested",
    "enable_fsdp2",
    "is_sharded",
    "local_shard_numels",
    "full_state_dict",
    "unsharded_denoiser",
    "sharded_lora_state_dict",
    "save_sharded_state",
    "load_sharded_state",
    "run_on_main_process",
    "full_gradients",
    "SHARDED_STATE_MARKER",
]

SHARDED_STATE_MARKER = "fd_onestep_sharded_state.json"


def _plain_module(model: torch.nn.Module) -> torch.nn.Module:
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def denoiser_block_classes(denoiser: torch.nn.Module) -> list[str]:
    """Class names of the denoiser's blocks that become one FSDP2 unit each, present in this model.

    The family adapter's ``block_classes`` (``FDOneStepPipeline.FAMILY_ADAPTERS``), else the model class's own
    ``_no_split_modules`` (diffusers' transformers name their blocks there). Names of classes the model does not
    instantiate are dropped (e.g. a UNet without attention blocks). Raises ``ValueError`` when none is present.
    """
    from fd_onestep.pipelines.pipeline_fd_onestep import adapter_of_denoiser

    denoiser = _plain_module(denoiser)
    adapter = adapter_of_denoiser(denoiser)
    names = adapter.block_classes if adapter.block_classes is not None else getattr(denoiser, "_no_split_modules", ())
    present = {type(m).__name__ for m in denoiser.modules()}
    found = [n for n in (names or ()) if n in present]
    if not found:
        raise ValueError(
            f"the {adapter.name!r} denoiser ({type(denoiser).__name__}) has none of the block classes {list(names or ())} "
            "to shard by; name its repeated blocks in the family adapter's `block_classes`."
        )
    return found


def fsdp2_requested() -> bool:
    """Whether the launch asked for FSDP2 (``accelerate launch --use_fsdp --fsdp_version 2`` or a config file
    with ``distributed_type: FSDP`` and ``fsdp_version: 2``), read from the environment accelerate launch sets."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and os.environ.get("FSDP_VERSION", "1") == "2")


def enable_fsdp2(accelerator, denoiser: torch.nn.Module, plugin=None) -> bool:
    """Make ``accelerator.prepare`` shard ``denoiser`` block by block with accelerate's FSDP2; call before it.

    Args:
        accelerator: the run's ``Accelerator``.
        denoiser: the (unprepared) denoiser, to read its block classes from.
        plugin: an ``accelerate.utils.FullyShardedDataParallelPlugin(fsdp_version=2, ...)``; default: the one
            accelerate built from the launch configuration (on GPUs), or one built from the same environment
            variables (gloo CPU processes, where accelerate drops it).
    Returns:
        True when the run is sharded (several processes and an FSDP2 configuration or ``plugin``), else False
        (nothing changed: one process, or data parallelism as before).

    The plugin keeps every setting of the configuration (mixed precision, ``reshard_after_forward``, CPU offload,
    activation checkpointing); unset, the auto-wrap policy becomes ``TRANSFORMER_BASED_WRAP`` over
    :func:`denoiser_block_classes`, and the state dict is always ``SHARDED_STATE_DICT`` (checkpoints are
    written by every process, its own shards, and resume at any size of the model).
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.num_processes < 2:
        return False
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif accelerator.distributed_type == DistributedType.MULTI_CPU and (plugin is not None or fsdp2_requested()):
        plugin = plugin if plugin is not None else FullyShardedDataParallelPlugin()
        # what AcceleratorState.__init__ does for an FSDP configuration on accelerators (accelerate 1.16, state.py)
        accelerator.state.distributed_type = DistributedType.FSDP
        type(accelerator.state)._shared_state["distributed_type"] = DistributedType.FSDP
        from accelerate.state import PartialState

        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
    else:
        return False
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"the FSDP configuration asks for FSDP version {plugin.fsdp_version}; fd-onestep shards with FSDP2: pass "
            "--fsdp_version 2 to accelerate launch (or fsdp_version: 2 in the config file, as "
            "configs/accelerate_fsdp2_8gpu.yaml)."
        )
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    # the block classes are this denoiser's unless the configuration names its own (fsdp_transformer_layer_cls_to_wrap);
    # a plugin used before (one process preparing several models) gets the new denoiser's
    if getattr(plugin, "_fd_onestep_blocks", False) or plugin.auto_wrap_policy is None:
        plugin.auto_wrap_policy = transformer_auto_wrap_policy
        plugin.transformer_cls_names_to_wrap = None
    if plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = denoiser_block_classes(denoiser)
        plugin._fd_onestep_blocks = True
    plugin.set_state_dict_type("SHARDED_STATE_DICT")
    logger.info("FSDP2: sharding the denoiser over %d processes by %s", accelerator.num_processes,
                plugin.transformer_cls_names_to_wrap)
    return True


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model passed through ``fully_shard`` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(_plain_module(model), FSDPModule)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_shard_numels(model: torch.nn.Module, optimizer=None) -> dict[str, int]:
    """Elements this process holds, from its local shards (``DTensor.to_local``), and the full model's.

    Returns ``{"parameters", "trainable_parameters", "gradients", "optimizer_state"}`` (local elements; gradients
    of the trainable parameters that have one, optimizer state tensors of more than one element, i.e. not
    Adam's step counters) and ``"full_parameters"``, ``"full_trainable_parameters"`` (the unsharded model's).
    """
    params = list(model.parameters())
    out = {
        "parameters": sum(_local(p).numel() for p in params),
        "trainable_parameters": sum(_local(p).numel() for p in params if p.requires_grad),
        "gradients": sum(_local(p.grad).numel() for p in params if p.grad is not None),
        "full_parameters": sum(p.numel() for p in params),
        "full_trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "optimizer_state": 0,
    }
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        for state in inner.state.values():
            out["optimizer_state"] += sum(_local(v).numel() for v in state.values()
                                          if isinstance(v, torch.Tensor) and v.numel() > 1)
    return out


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (gathered) state dict of a sharded model on the main process's CPU, ``{}`` on the others.

    A collective: call on every process. ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with
    ``full_state_dict=True, cpu_offload=True``: one parameter gathered at a time, so no process holds more than
    the main process's CPU copy of the model. A plain model's own state dict otherwise.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = _plain_module(model)
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_denoiser(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) copy of the diffusers ``model`` on the CPU holding ``state_dict`` (from
    :func:`full_state_dict`), for ``save_pretrained`` and ``FDOneStepGenerator.save_pipeline``. Main process only.

    Built from the model's config on the meta device and filled by assignment, so the tensors of ``state_dict``
    are the copy's parameters (no second copy). A state dict with a PEFT LoRA is refused: save the LoRA with
    :func:`sharded_lora_state_dict`.
    """
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import FSDPModule

    model = _plain_module(model)
    cls = next(c for c in type(model).__mro__ if issubclass(c, torch.nn.Module) and not issubclass(c, FSDPModule))
    with init_empty_weights():
        copy = cls.from_config(model.config)
    if any("lora_" in k for k in state_dict):
        raise ValueError("the state dict carries a LoRA: save it with sharded_lora_state_dict (a merged full pipeline "
                         "of a sharded LoRA run is not written by unsharded_denoiser).")
    copy.load_state_dict(state_dict, strict=True, assign=True)
    return copy.eval()


def sharded_lora_state_dict(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA of a (sharded) denoiser as ``denoiser_lora_state_dict`` gives it for a plain one, gathered on the
    main process's CPU (``{}`` on the others). A collective: call on every process."""
    from peft import get_peft_model_state_dict

    full = full_state_dict(model)
    if not full:
        return {}
    lora = get_peft_model_state_dict(_plain_module(model), state_dict=full, adapter_name=adapter_name)
    return {k: v.contiguous() for k, v in lora.items()}


def save_sharded_state(state: Any, folder: str | os.PathLike) -> None:
    """Save a nested state holding sharded tensors (e.g. ``EMAModel.state_dict()`` over sharded parameters) to
    ``folder`` with ``torch.distributed.checkpoint``: every process writes its own shards, no pickle (the
    structure and scalars as JSON). A collective: call on every process."""
    import torch.distributed.checkpoint as dcp

    from fd_onestep.training.state import flatten_state

    tensors, skeleton = flatten_state(state, to_cpu=False)
    folder = Path(folder)
    dcp.save(tensors, checkpoint_id=str(folder))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        (folder / SHARDED_STATE_MARKER).write_text(json.dumps(skeleton))


def load_sharded_state(template: Any, folder: str | os.PathLike) -> Any:
    """Load what :func:`save_sharded_state` wrote into tensors laid out like ``template`` (the current state, e.g.
    ``ema.state_dict()``: its sharded tensors give each process's shards); returns the loaded state. Collective."""
    import torch.distributed.checkpoint as dcp

    from fd_onestep.training.state import flatten_state, unflatten_state

    tensors, _ = flatten_state(template, to_cpu=False)
    skeleton = json.loads((Path(folder) / SHARDED_STATE_MARKER).read_text())
    dcp.load(tensors, checkpoint_id=str(folder))
    return unflatten_state(tensors, skeleton)


class _DenoiserOfMainProcess(torch.nn.Module):
    """The main process's view of a sharded denoiser inside :func:`run_on_main_process`: each call first sends its
    inputs to the other processes, which join the forward (FSDP2 gathers each block from the shards of all)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.module = model

    def __getattr__(self, name):  # config, dtype, ...: the denoiser's own
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def forward(self, *args, **kwargs):
        from accelerate.utils import send_to_device

        _send_to_followers(("forward", send_to_device((args, kwargs), "cpu")))
        # no_grad outside inference mode: a sharded root keeps its gathered parameters after a forward, and
        # inference tensors among them could not enter the next training step
        with torch.inference_mode(False), torch.no_grad():
            return self.module(*args, **kwargs)


def _send_to_followers(message):
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([message], from_process=0)[0]


def run_on_main_process(accelerator, model: torch.nn.Module, fn):
    """``fn(denoiser)`` on the main process, for code that runs there alone and calls the denoiser (validation
    grids, CLIP score, the teacher comparison); returns its result there and None on the other processes.

    A sharded (FSDP2) denoiser runs a forward only with every process taking part. Here ``fn`` gets a stand-in
    whose every call first broadcasts its inputs (through the CPU, :func:`accelerate.utils.broadcast_object_list`),
    and the other processes run the same forward under ``no_grad`` and the run's autocast, discarding its output,
    until ``fn`` returns; an exception in ``fn`` is raised on every process. Inference only. A model that is not
    sharded: ``fn(model)`` on the main process, nothing on the others. A collective: call on every process.
    """
    from accelerate.utils import send_to_device

    if not is_sharded(model):
        return fn(model) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        try:
            result = fn(_DenoiserOfMainProcess(model))
        except BaseException as err:
            _send_to_followers(("failed", f"{type(err).__name__}: {err}"))
            raise
        _send_to_followers(("done", None))
        return result
    while True:
        kind, payload = _send_to_followers(None)
        if kind == "done":
            return None
        if kind == "failed":
            raise RuntimeError(f"the main process failed in code it runs alone with the sharded denoiser: {payload}")
        args, kwargs = send_to_device(payload, accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            model(*args, **kwargs)


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole gradients of a model's trainable parameters on the CPU, by parameter name (the plain model's
    names). Sharded (FSDP2): each gathered from the processes' shards (``DTensor.full_tensor``), a collective:
    call on every process; every process gets them."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in _plain_module(model).named_parameters():
        if p.requires_grad and p.grad is not None:
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            out[name] = grad.detach().cpu().contiguous()
    return out
