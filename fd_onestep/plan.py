"""``fd-onestep plan``: memory and compute of a training step at real size, before any GPU is rented.

Every part is built from its config with random weights (diffusers' and transformers' own classes) under
``torch._subclasses.fake_tensor.FakeTensorMode``: fake CPU tensors carry shapes and dtypes, nothing is allocated
and no kernel runs, so an SDXL UNet's forward and backward at 1024 px takes seconds. One training step (the
generator's one step, its decode, the FD encoders, the FD-loss against an EMA population, backward) runs as the
training script runs it (``OneStepGenerator``, ``MultiEncoderFDLoss``), under the run's autocast.

What is counted, and how (docs/plan.md has the formulas):

- weights: the bytes of every parameter and buffer in the dtype the training script gives it (frozen modules
  and a LoRA's base weights in the mixed-precision dtype; trainable parameters in float32);
- gradients and optimizer state: 4 and 8 bytes per trainable parameter (float32 gradient; AdamW's two moments);
- the step's transient memory: a dispatch mode adds the bytes of every storage an operator creates and subtracts
  them when the storage dies, so its peak is the activations held for backward plus the largest transients
  (gradients are pre-allocated, so it excludes them); the activations held by each part are the bytes that
  ``torch.autograd.graph.saved_tensors_hooks`` sees it save;
- compute: ``torch.utils.flop_counter.FlopCounterMode``, forward and backward attributed to the part whose
  module ran (backward by gradient arrival at each part's output); float64 eigendecompositions as 9 d^3;
- attention: ``scaled_dot_product_attention`` resolves to the fused (flash) kernel, which keeps no N x N matrix,
  as the fused GPU kernels hold it.

Memory grows linearly in the batch: the plan runs the step at batch 1, 2, 8 and the requested batch (all on fake
tensors; the FD math, which runs for real, at no more than 512 rows and extrapolated beyond) and extrapolates the
largest batch that fits ``gpu_memory_gb`` along the line through the two largest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence
from unittest import mock

import torch

REAL_CONFIGS_DIR = Path(__file__).resolve().parent / "real_configs"
GIB = 1024**3
# Defaults of the step-time prediction (stated in the table): H100 SXM dense bf16 throughput and a utilization
# typical of diffusion training (a flag each).
DEFAULT_PEAK_TFLOPS = 989.0
DEFAULT_UTILIZATION = 0.4
ATTENTION_ASSUMPTION = ("attention as fused kernels hold it (scaled_dot_product_attention -> flash kernel: no "
                        "N x N matrix kept)")
# Default FD encoders of the real-size table.
DEFAULT_ENCODERS = ("inception", "dinov2")
_EIGH_FLOPS_PER_D3 = 9.0


# ------------------------------------------------------------------------------------------------ teachers
def list_real_configs() -> list[str]:
    """Names of the bundled real teacher configs (folders with a ``model_index.json``)."""
    return sorted(p.parent.name for p in REAL_CONFIGS_DIR.glob("*/model_index.json"))


def real_config_index() -> dict:
    return json.loads((REAL_CONFIGS_DIR / "index.json").read_text())


def resolve_teacher(name_or_path: str, *, cache_dir=None, local_files_only: bool = False) -> Path:
    """A pipeline folder with configs: a bundled real config's name, a local folder, or a Hub id (of which only
    the ``*.json`` config files are fetched)."""
    if name_or_path in list_real_configs():
        return REAL_CONFIGS_DIR / name_or_path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"--teacher '{name_or_path}' has no model_index.json: pass a diffusers pipeline folder, a Hub "
                             f"id or a bundled config ({', '.join(list_real_configs())}).")
        return path
    if path.exists() or name_or_path.count("/") != 1:
        raise ValueError(f"--teacher '{name_or_path}' is neither a bundled config ({', '.join(list_real_configs())}), "
                         "a pipeline folder, nor a Hub id (owner/name).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json"], cache_dir=cache_dir,
                                      local_files_only=local_files_only))
    except Exception as err:  # offline, gated, missing: one line
        raise ValueError(f"--teacher '{name_or_path}': its config files could not be fetched ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}).") from None


def _placeholder_tokenizer(max_length: int):
    """A tokenizer for the pipeline's tokenizer slots: the plan never tokenizes a real prompt, but the stock
    ``encode_prompt`` pads to ``max_length`` tokens, which fixes the prompt-embedding shapes."""
    import string
    import tempfile

    from transformers import CLIPTokenizer

    # a minimal byte-pair vocabulary (the special tokens and single characters), no merges
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab))
        Path(folder, "merges.txt").write_text("#version: 0.2\n")
        tok = CLIPTokenizer(str(Path(folder, "vocab.json")), str(Path(folder, "merges.txt")))
    tok.model_max_length = int(max_length)
    return tok


def build_components(folder: Path) -> dict:
    """Every component of the pipeline folder built from its config with random weights (call under fake mode).
    Tokenizers are placeholders whose ``model_max_length`` is their text encoder's position count (CLIP: 77)."""
    import diffusers
    import transformers

    index = json.loads((folder / "model_index.json").read_text())
    components, tokenizers = {}, []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        library, cls_name = spec
        if name.startswith("tokenizer"):
            tokenizers.append(name)
            continue
        sub = folder / name
        if library == "diffusers":
            cls = getattr(diffusers, cls_name)
            config = cls.load_config(sub)
            if issubclass(cls, diffusers.SchedulerMixin):
                with _real_tensors():  # its noise schedule is read as values
                    components[name] = cls.from_config(config)
            else:
                with _shapes_only():
                    components[name] = _fake_parameters(cls.from_config(config))
        elif library == "transformers":
            config = transformers.AutoConfig.from_pretrained(sub)
            with _shapes_only():
                components[name] = _fake_parameters(getattr(transformers, cls_name)._from_config(config))
        else:
            raise ValueError(f"{folder.name}/{name}: components from '{library}' are not supported by the plan.")
    for name in tokenizers:
        encoder = components.get(name.replace("tokenizer", "text_encoder"))
        positions = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
        with _real_tensors():
            components[name] = _placeholder_tokenizer(min(int(positions or 512), 512))
    return components


def build_pipeline(folder: Path, resolution: Optional[int] = None, **one_step_settings):
    """An ``FDOneStepPipeline`` from the folder's configs (call under fake mode), generating ``resolution`` px."""
    import inspect

    from .pipelines.pipeline_fd_onestep import FDOneStepPipeline

    components = build_components(folder)
    accepted = inspect.signature(FDOneStepPipeline.__init__).parameters
    unused = sorted(set(components) - set(accepted))
    if unused:
        raise ValueError(f"{folder.name}: the installed FDOneStepPipeline takes no {', '.join(unused)}: this family is "
                         "not supported yet.")
    with _real_tensors():  # the constructor reads the noise schedule as values
        pipe = FDOneStepPipeline(**components, **one_step_settings)
        if resolution is not None:
            pipe.register_to_config(sample_size=int(resolution // pipe.vae_scale_factor))
        level = pipe.noise_level()
    # the one step reads its noise level as numbers, which fake tensors do not have: fixed once, here
    pipe.noise_level = lambda: level
    return pipe


# ------------------------------------------------------------------------------------------------ encoders
@contextlib.contextmanager
def _weightless_encoders():
    """Build the project's encoders with random weights: the FID Inception's weights file and transformers'
    ``from_pretrained`` are replaced by construction from the config (under fake mode nothing is allocated)."""
    import transformers

    from .encoders import inception

    def from_config(cls, model_id, *args, **kwargs):
        config = transformers.AutoConfig.from_pretrained(model_id)
        return cls._from_config(config)

    with mock.patch.object(inception, "_load_fid_state_dict", lambda *a, **k: {}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None), \
            mock.patch.object(transformers.PreTrainedModel, "from_pretrained", classmethod(from_config)):
        yield


def build_encoder(name: str, device=None, gradient_checkpointing: bool = False):
    """An FD encoder for the plan: 'inception', 'dinov2' (bundled configs, random weights) or anything
    ``load_encoder`` loads offline (a local folder, the bundled digits encoders)."""
    from .encoders import load_encoder

    bundled = real_config_index().get("encoders", {})
    if name in bundled:
        source = "inception" if name == "inception" else str(REAL_CONFIGS_DIR / bundled[name])
        with _weightless_encoders(), _shapes_only():
            enc = _fake_parameters(load_encoder(source, gradient_checkpointing=gradient_checkpointing))
    else:
        enc = load_encoder(name, device=device, gradient_checkpointing=gradient_checkpointing)
    enc.check_inputs = False  # the range check reads values; fake tensors have none
    return enc


# ------------------------------------------------------------------------------------------------ counting
class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the storages created by operators while active, alive now and at the peak."""

    def __init__(self):
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self._seen = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place op returns an input's storage: not an allocation, even if the storage predates
        # the mode (a weight's transpose must not count the weight)
        inputs = {id(t.untyped_storage()) for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._seen and id(storage) not in inputs:
                    nbytes = storage.nbytes()
                    self._seen[storage] = nbytes
                    self.current += nbytes
                    weakref.finalize(storage, self._free, nbytes)
        self.peak = max(self.peak, self.current)
        return out


def _eigh_flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a symmetric eigendecomposition with vectors of (..., d, d) (FlopCounterMode passes shapes)."""
    batch = math.prod(a_shape[:-2]) if len(a_shape) > 2 else 1
    return int(_EIGH_FLOPS_PER_D3 * batch * a_shape[-1] ** 3)


class _GlobalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: the plan reads only the global total (it attributes FLOPs
    to parts itself, ``_Parts``). The tracker's multi-grad hooks close over autograd nodes in reference cycles, so
    the saved tensors of every graph they touch die only when Python's garbage collector runs, and the step's
    transient peak depended on when it ran (a process's import history, its allocation counts): the same flags gave
    different peaks from ``fd-onestep plan`` and ``train_fd_onestep.py --plan``. A real run has no tracker."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    for name in ("_linalg_eigh", "linalg_eigh"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            mapping[op] = _eigh_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    counter.mod_tracker = _GlobalOnly()
    return counter


class _Parts:
    """Attributes saved-tensor bytes and FLOPs to the part (a top-level module) that runs."""

    def __init__(self, counter):
        self.counter = counter
        self.stack = ["other"]
        self.saved = {}
        self.flops = {}
        self._mark = 0
        self._storages = set()
        self.in_backward = False
        self.handles = []

    def _charge(self, part: str) -> None:
        total = self.counter.get_total_flops()
        self.flops[part] = self.flops.get(part, 0) + total - self._mark
        self._mark = total

    def enter(self, part: str) -> None:
        self._charge(self.stack[-1])
        self.stack.append(part)

    def leave(self) -> None:
        self._charge(self.stack.pop())

    def watch(self, module: torch.nn.Module, part: str) -> None:
        def pre(mod, args):
            if not self.in_backward:
                self.enter(part)

        def post(mod, args, output):
            if self.in_backward:
                return
            self.leave()
            for t in torch.utils._pytree.tree_leaves(output):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda g, part=part: self._backward_reaches(part))

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def _backward_reaches(self, part: str) -> None:
        # the gradient w.r.t. this part's output exists: its backward starts now
        self._charge(self.stack[-1])
        self.stack[-1] = part

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage()
        if id(key) not in self._storages and not isinstance(t, torch.nn.Parameter):
            self._storages.add(id(key))
            part = self.stack[-1]
            self.saved[part] = self.saved.get(part, 0) + key.nbytes()
        return t

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class PlanSettings:
    """One planned configuration (the training script's flags of the same names)."""

    teacher: str
    resolution: Optional[int] = None
    batch_size: int = 1
    use_lora: bool = True
    lora_rank: int = 8
    mixed_precision: str = "bf16"
    encoders: Sequence[str] = DEFAULT_ENCODERS
    encoder_gradient_checkpointing: bool = False
    gradient_checkpointing: bool = False
    vae_gradient_checkpointing: bool = False
    decode_micro_batch_size: Optional[int] = None
    surrogate_decoder: Optional[str] = None
    fd_ema_beta: float = 0.999
    gpu_memory_gb: float = 80.0
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    utilization: float = DEFAULT_UTILIZATION
    num_gpus: int = 8
    fsdp: bool = False  # plan a sharded run (FSDP2 over num_gpus, text encoders off the GPU, prompt store)
    guidance_scale: float = 1.0  # > 1 with true classifier-free guidance: the denoiser sees twice the batch
    max_sequence_length: Optional[int] = None  # text tokens per prompt (default: the stock pipeline's)

    @property
    def savers(self) -> list[str]:
        names = []
        for flag in ("gradient_checkpointing", "vae_gradient_checkpointing", "encoder_gradient_checkpointing"):
            if getattr(self, flag):
                names.append(f"--{flag}")
        if self.decode_micro_batch_size:
            names.append(f"--decode_micro_batch_size {self.decode_micro_batch_size}")
        if self.surrogate_decoder:
            names.append(f"--surrogate_decoder {self.surrogate_decoder}")
        return names


def resolve_mixed_precision(value: Optional[str]) -> str:
    """``--mixed_precision`` as the training run gets it: the value given, else accelerate's (``accelerate launch``
    sets ACCELERATE_MIXED_PRECISION; then its default config file), else "no"."""
    if value is not None:
        return value
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    try:
        from accelerate.commands.config.config_args import default_config_file, load_config_from_file

        if os.path.isfile(default_config_file):
            found = load_config_from_file(default_config_file).mixed_precision
            return str(getattr(found, "value", found) or "no")
    except Exception:  # an unreadable accelerate config: accelerate itself says why when the run starts
        pass
    return "no"


def settings_from_args(args) -> "PlanSettings":
    """The :class:`PlanSettings` of a training run from its arguments, by the training script's names (``fd-onestep
    plan`` and ``train_fd_onestep.py --plan`` both parse them): the same flags plan the same run."""
    encoders = [n for spec in args.encoders for n in str(spec).replace(",", " ").split()]
    return PlanSettings(
        teacher=args.pretrained_model_name_or_path, resolution=args.resolution, batch_size=args.train_batch_size,
        use_lora=args.use_lora, lora_rank=args.lora_rank, mixed_precision=resolve_mixed_precision(args.mixed_precision),
        encoders=encoders, encoder_gradient_checkpointing=args.encoder_gradient_checkpointing,
        gradient_checkpointing=args.gradient_checkpointing, vae_gradient_checkpointing=args.vae_gradient_checkpointing,
        decode_micro_batch_size=args.decode_micro_batch_size, surrogate_decoder=args.surrogate_decoder,
        fd_ema_beta=getattr(args, "fd_ema_beta", 0.999), gpu_memory_gb=getattr(args, "gpu_memory_gb", 80.0),
        peak_tflops=getattr(args, "peak_tflops", DEFAULT_PEAK_TFLOPS),
        utilization=getattr(args, "utilization", DEFAULT_UTILIZATION), num_gpus=getattr(args, "num_gpus", 8),
        fsdp=getattr(args, "fsdp", False), guidance_scale=getattr(args, "guidance_scale", 1.0),
        max_sequence_length=getattr(args, "max_sequence_length", None),
    )


@dataclass
class StepMeasure:
    batch_size: int
    transient_peak: int  # bytes: activations held for backward + transients (no weights, no gradients)
    saved: dict  # part -> bytes saved for backward
    flops: dict  # part -> FLOPs (forward + backward) of the whole batch
    rss_delta: Optional[int] = None  # real runs (fake=False) on Linux: peak resident memory of the step - before
    allocated_peak: Optional[int] = None  # real runs: peak bytes the allocator handed out in the step (profiler)
    seconds: Optional[float] = None  # real runs: wall time of the same step without the counters


@dataclass
class Plan:
    settings: PlanSettings
    family: str
    resolution: int
    weights: dict  # component -> bytes
    trainable_params: int
    fd_state: int  # bytes of populations and reference statistics
    steps: dict = field(default_factory=dict)  # batch -> StepMeasure
    notes: list = field(default_factory=list)
    # FSDP2 units (the blocks of fd_onestep.training.sharding): a unit gathers only the parameters no nested unit
    # holds. The largest unit's weights, the largest unit's gradients (float32, trainable parameters only), and the
    # root's (the parameters in no block; FSDP2 keeps the root gathered from its forward to its backward), bytes
    block_bytes: int = 0
    block_grad_bytes: int = 0
    root_bytes: int = 0
    prompt_bytes: int = 0  # one prompt's stored embeddings (weight dtype), bytes; 0 for models without prompts

    # -- memory
    @property
    def gradients(self) -> int:
        return 4 * self.trainable_params

    @property
    def optimizer_state(self) -> int:
        return 8 * self.trainable_params

    @property
    def static(self) -> int:
        return sum(self.weights.values()) + self.gradients + self.optimizer_state + self.fd_state

    def _line(self) -> tuple[int, float, int, float]:
        """The two largest measured batches and their transient peaks: the peak can move from one part to another
        as the batch grows (a fixed decode transient at batch 1, a per-sample recompute later), so the line
        through the largest batches is the one that extrapolates."""
        (b1, m1), (b2, m2) = sorted(self.steps.items())[-2:]
        return b1, m1.transient_peak, b2, m2.transient_peak

    def transient(self, batch: int) -> float:
        if batch in self.steps:
            return self.steps[batch].transient_peak
        b1, a, b2, b = self._line()
        return a + (b - a) * (batch - b1) / (b2 - b1)

    def peak(self, batch: int) -> float:
        return self.static + self.transient(batch)

    def max_batch(self, memory_bytes: Optional[float] = None) -> int:
        cap = (memory_bytes if memory_bytes is not None else self.settings.gpu_memory_gb * 1e9)
        if self.static + self.steps[min(self.steps)].transient_peak > cap:
            return 0
        b1, a, b2, b = self._line()
        if b <= a:  # not increasing between the two largest measured batches: no answer
            return None
        per_sample = (b - a) / (b2 - b1)
        return int(b1 + (cap - self.static - a) // per_sample)

    def sharded(self, num_gpus: int, batch: int) -> dict:
        """Per-GPU bytes of a sharded run (FSDP2, docs/several_gpus.md), part by part: the denoiser's weights,
        gradients and AdamW state divided over ``num_gpus``; two of its blocks gathered whole at a time (the one
        running and the one prefetched) and one block's unsharded gradients before its reduce-scatter (a block's own
        parameters: those of blocks nested in it are gathered as blocks of their own); the root's parameters, in no
        block, gathered for the whole step; the VAE, the
        FD encoders and the FD state replicated; the text encoders off the GPU (the prompts are stored on disk);
        the activations per GPU as without sharding."""
        text = {k: v for k, v in self.weights.items() if k.startswith("text_encoder")}
        replicated = sum(v for k, v in self.weights.items() if k != "denoiser" and k not in text)
        return {
            "denoiser weights (1/N)": self.weights["denoiser"] / num_gpus,
            "gradients (1/N)": self.gradients / num_gpus,
            "optimizer state (1/N)": self.optimizer_state / num_gpus,
            "gathered blocks (2 blocks' weights, 1 block's gradients)": 2 * self.block_bytes + self.block_grad_bytes,
            "gathered root (parameters in no block, with their gradients)": self.root_bytes,
            "replicated: VAE, FD encoders": replicated,
            "populations and reference statistics": self.fd_state,
            "activations and transients": self.transient(batch),
        }

    def sharded_per_gpu(self, num_gpus: int, batch: int) -> float:
        return sum(self.sharded(num_gpus, batch).values())

    def prompt_store_host_bytes(self, shard_size: int = 1024) -> int:
        """Host memory a process adds for the prompt store while encoding: one shard of ``shard_size`` prompts
        (``fd_onestep.prompt_store``); in training its rows are read from the memory-mapped shards (file cache,
        shared by the processes of a node)."""
        return shard_size * self.prompt_bytes

    # -- compute
    def flops_per_sample(self, batch: Optional[int] = None) -> dict:
        step = self.steps[batch or 2]
        return {k: v / step.batch_size for k, v in step.flops.items()}

    def step_time(self, batch: int) -> float:
        per = self.flops_per_sample()
        return batch * sum(per.values()) / (self.settings.peak_tflops * 1e12 * self.settings.utilization)

    # -- report
    def to_dict(self) -> dict:
        s = self.settings
        return {
            "teacher": s.teacher, "family": self.family, "resolution": self.resolution, "batch_size": s.batch_size,
            "lora": s.use_lora, "mixed_precision": s.mixed_precision, "encoders": list(s.encoders), "savers": s.savers,
            "weights_bytes": self.weights, "gradients_bytes": self.gradients, "optimizer_bytes": self.optimizer_state,
            "fd_state_bytes": self.fd_state, "trainable_params": self.trainable_params,
            "activations_saved_bytes": {b: m.saved for b, m in self.steps.items()},
            "transient_peak_bytes": {b: m.transient_peak for b, m in self.steps.items()},
            "peak_bytes": self.peak(s.batch_size), "max_batch": self.max_batch(),
            "flops_per_sample": self.flops_per_sample(), "step_time_s": self.step_time(s.batch_size),
            "gpu_memory_gb": s.gpu_memory_gb, "peak_tflops": s.peak_tflops, "utilization": s.utilization,
            **({"num_gpus": s.num_gpus, "sharded_bytes": self.sharded(s.num_gpus, s.batch_size),
                "sharded_per_gpu_bytes": self.sharded_per_gpu(s.num_gpus, s.batch_size),
                "prompt_bytes": self.prompt_bytes, "prompt_store_host_bytes": self.prompt_store_host_bytes()}
               if s.fsdp else {}),
        }

    def to_markdown(self) -> str:
        s, b = self.settings, self.settings.batch_size
        gb = _bytes_text
        lines = [
            f"## fd-onestep plan: {s.teacher} ({self.family}), {self.resolution} px, batch {b} per GPU, "
            f"{'LoRA r' + str(s.lora_rank) if s.use_lora else 'full fine-tune'}, {s.mixed_precision}",
            f"savers: {', '.join(s.savers) or 'none'}; FD encoders: {', '.join(s.encoders)}",
            "",
            "| memory per GPU | bytes |",
            "|---|---:|",
        ]
        for name, v in self.weights.items():
            lines.append(f"| weights: {name} | {gb(v)} |")
        lines += [f"| gradients (float32, {self.trainable_params / 1e6:.1f}M trainable) | {gb(self.gradients)} |",
                  f"| optimizer state (AdamW, float32) | {gb(self.optimizer_state)} |",
                  f"| populations and reference statistics (float64) | {gb(self.fd_state)} |"]
        saved = self.steps[b].saved if b in self.steps else {k: v * b for k, v in self._saved_per_sample().items()}
        for part, v in saved.items():
            lines.append(f"| activations held for backward: {part} | {gb(v)} |")
        lines += [f"| **step peak (weights + gradients + optimizer + activations + transients)** | **{gb(self.peak(b))}** |",
                  "", f"Largest batch per GPU that fits {s.gpu_memory_gb:g} GB: **{self.max_batch() if self.max_batch() is not None else 'undetermined (the step at the largest measured batch holds less than at the one before; plan --batch_size B directly)'}** "
                  f"(memory per sample between batch {self._line()[0]} and {self._line()[2]}: "
                  f"{gb((self._line()[3] - self._line()[1]) / (self._line()[2] - self._line()[0]))}).", ""]
        if s.fsdp:
            lines += [f"| sharded over {s.num_gpus} GPUs (FSDP2), per GPU | bytes |", "|---|---:|"]
            lines += [f"| {part} | {gb(v)} |" for part, v in self.sharded(s.num_gpus, b).items()]
            total = self.sharded_per_gpu(s.num_gpus, b)
            lines += [f"| **per GPU, batch {b}** | **{gb(total)}** ({'fits' if total <= s.gpu_memory_gb * 1e9 else 'does not fit'} "
                      f"{s.gpu_memory_gb:g} GB) |", ""]
            if self.prompt_bytes:
                lines += [f"Prompt store: {gb(self.prompt_bytes)} per prompt on disk ({gb(self.prompt_bytes * 50_000)} for "
                          f"50,000 prompts), memory-mapped; host memory a process adds: one shard of 1024 prompts "
                          f"while encoding ({gb(self.prompt_store_host_bytes())}), whatever the number of prompts.", ""]
        elif not s.use_lora and self.peak(1) > s.gpu_memory_gb * 1e9:
            lines.append(f"Full fine-tune sharded over {s.num_gpus} GPUs (FSDP2): "
                         f"{gb(self.sharded_per_gpu(s.num_gpus, b))} per GPU at batch {b}; --fsdp gives it part by "
                         "part (docs/several_gpus.md).")
            lines.append("")
        per = self.flops_per_sample()
        total = sum(per.values())
        lines += ["| compute per sample (forward + backward) | TFLOP | share |", "|---|---:|---:|"]
        for part, v in per.items():
            lines.append(f"| {part} | {v / 1e12:.4g} | {100 * v / total:.1f}% |")
        lines += [f"| **total** | **{total / 1e12:.4g}** | 100% |", "",
                  f"Predicted step time at batch {b}: **{self.step_time(b):.4g} s** at {s.peak_tflops:g} TFLOP/s bf16 x "
                  f"{s.utilization:g} utilization (--peak_tflops, --utilization).",
                  f"Assumptions: {ATTENTION_ASSUMPTION}; CPU autocast ({s.mixed_precision}) stands in for CUDA's; memory "
                  "linear in the batch beyond the two largest measured batches (1, 2, 8 and --batch_size are measured); the optimizer step's temporaries are not counted.",
                  *self.notes]
        return "\n".join(lines)

    def _saved_per_sample(self) -> dict:
        one, two = self.steps[1].saved, self.steps[2].saved
        return {k: two.get(k, 0) - one.get(k, 0) for k in two}


# ------------------------------------------------------------------------------------------------ the plan
_ACTIVE_FAKE_MODE: list = []


@contextlib.contextmanager
def _shapes_only():
    """Build modules on the meta device (no initialization work) when planning with fake tensors."""
    if not _ACTIVE_FAKE_MODE:
        yield
        return
    with _real_tensors(), torch.device("meta"):
        yield


def _fake_parameters(module: torch.nn.Module) -> torch.nn.Module:
    """Replace a meta module's parameters and buffers by fake CPU tensors of the same shapes and dtypes."""
    if not _ACTIVE_FAKE_MODE:
        return module
    mode = _ACTIVE_FAKE_MODE[-1]
    cpu = torch.device("cpu")

    def fake(t):
        return mode.fake_tensor_converter.from_meta_and_device(mode, t, cpu) if t.device.type == "meta" else t

    for sub in module.modules():
        for key, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[key] = torch.nn.Parameter(fake(p.data), requires_grad=p.requires_grad)
        for key, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[key] = fake(b)
    return module


class _ResidentMemory:
    """Peak resident memory since creation, less the resident memory at creation (Linux /proc; a real run)."""

    def __init__(self):
        import gc

        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        self.before = self._read("VmRSS")

    @staticmethod
    def _read(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {key}")

    def peak_delta(self) -> int:
        return self._read("VmHWM") - self.before


class _AllocatedMemory:
    """Peak bytes the CPU allocator handed out since creation, above what it held at creation (a real run; the
    torch profiler's memory events, replayed in time order). What a GPU's allocator would be asked for: unlike
    resident memory, it leaves out the process's own overheads (kernel code pages, scratch, Python objects)."""

    def __init__(self):
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()

    def peak_delta(self) -> int:
        self._profiler.__exit__(None, None, None)
        events = [e for e in self._profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        current = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            current += event.nbytes()  # negative for a free
            peak = max(peak, current)
        return peak


def _bytes_text(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.2f} MB"


def _real_tensors():
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _unit_bytes(unit: torch.nn.Module, units: list, trainable_grads: bool = False) -> int:
    """Bytes an FSDP2 unit gathers: the parameters and buffers of ``unit`` outside the other ``units`` nested in it;
    ``trainable_grads``: instead, the float32 gradients of its trainable parameters."""
    nested = {id(m) for m in units if m is not unit}
    own, stack = [], [unit]
    while stack:
        module = stack.pop()
        own.append(module)
        stack.extend(child for child in module.children() if id(child) not in nested)
    if trainable_grads:
        return sum(4 * p.numel() for m in own for p in m.parameters(recurse=False) if p.requires_grad)
    return sum(t.numel() * t.element_size() for m in own for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])


def _dtype(name: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[name]


class _NoMemo(dict):
    """A converter memo that holds one entry, the conversion under way, and forgets it once read: no weak
    references (Module.to() swaps fake parameters), and no strong ones either, or every operator output the
    fake mode memoizes (``from_meta_and_device``) would stay alive and count as live memory."""

    def __setitem__(self, key, value):
        self.clear()
        super().__setitem__(key, value)

    def get(self, key, default=None):
        return self.pop(key, default)


def make_plan(settings: PlanSettings, *, fake: bool = True, batches: Sequence[int] | None = None) -> Plan:
    """Build the parts, run one training step per batch size in ``batches`` (default 1, 2, 8 and the requested
    batch) and return the :class:`Plan`. ``fake=False`` runs the same step with real CPU tensors (checks)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    if fake:
        # The converter's memo keeps a weak reference to every fake tensor, and Module.to() swaps fake parameters
        # (torch.utils.swap_tensors refuses tensors with weak references): the plan needs no memo.
        mode.fake_tensor_converter.meta_converter.tensor_memo = _NoMemo()
    folder = resolve_teacher(settings.teacher)
    if fake:
        _ACTIVE_FAKE_MODE.append(mode)
    try:
        with mode:
            return _plan_in_mode(settings, folder, batches or sorted({*PLANNED_BATCHES, settings.batch_size}))
    finally:
        if fake:
            _ACTIVE_FAKE_MODE.pop()


def _plan_in_mode(settings: PlanSettings, folder: Path, batches) -> Plan:
    from .losses import FDLoss, MultiEncoderFDLoss
    from .memory_savers import DecodeSavers, load_surrogate_decoder
    from .onestep import OneStepGenerator, prepare_training
    from .populations import build_population
    from .reference_stats import ReferenceStats

    weight_dtype = _dtype(settings.mixed_precision)
    torch.manual_seed(0)
    pipe = build_pipeline(folder, settings.resolution, guidance_scale=settings.guidance_scale,
                          **({"max_sequence_length": settings.max_sequence_length} if settings.max_sequence_length else {}))
    resolution = pipe.image_shape()[-1]
    surrogate = None
    if settings.surrogate_decoder:
        from diffusers import AutoencoderTiny

        name = settings.surrogate_decoder
        path = REAL_CONFIGS_DIR / name if (REAL_CONFIGS_DIR / name / "config.json").is_file() else Path(name)
        if not (path / "config.json").is_file():
            raise ValueError(f"--surrogate_decoder '{name}': the plan needs an AutoencoderTiny config: a bundled one "
                             "(taesd, taesdxl, taesd3, taef1) or a folder with config.json.")
        if not _ACTIVE_FAKE_MODE and (path / "diffusion_pytorch_model.safetensors").is_file():
            surrogate = load_surrogate_decoder(str(path))
        else:  # the plan needs its shapes only
            with _shapes_only():
                surrogate = _fake_parameters(AutoencoderTiny.from_config(AutoencoderTiny.load_config(path)))
            surrogate.requires_grad_(False).eval()
        if not pipe.is_latent:
            raise ValueError(f"--surrogate_decoder: {settings.teacher} is a pixel-space teacher (no VAE decode to "
                             "stand in for); drop it.")
        from .memory_savers import check_surrogate_fits

        check_surrogate_fits(surrogate, pipe.vae)
    gen = OneStepGenerator(pipe, device="cpu", weight_dtype=weight_dtype,
                           decode_savers=DecodeSavers(settings.decode_micro_batch_size, surrogate))
    denoiser = gen.denoiser
    trainable = prepare_training(gen, use_lora=settings.use_lora, lora_rank=settings.lora_rank,
                                 gradient_checkpointing=settings.gradient_checkpointing,
                                 vae_gradient_checkpointing=settings.vae_gradient_checkpointing)

    encoders = {name: build_encoder(name, gradient_checkpointing=settings.encoder_gradient_checkpointing)
                for name in settings.encoders}
    weights = {"denoiser": _module_bytes(denoiser)}
    for name in pipe.frozen_component_names:
        weights[name] = _module_bytes(getattr(pipe, name))
    if surrogate is not None:
        weights["surrogate decoder"] = _module_bytes(surrogate)
    for name, enc in encoders.items():
        weights[f"encoder {name}"] = _module_bytes(enc)

    # The FD math reads values (checks, eigenvalues): it runs for real, on random features of the right shapes,
    # outside fake mode; the rest of the step sees its gradient as a (B, d) tensor per encoder.
    with _real_tensors():
        losses = {}
        for name, enc in encoders.items():
            d = enc.feature_dim
            ref = ReferenceStats(mu=torch.zeros(d, dtype=torch.float64), sigma=torch.eye(d, dtype=torch.float64),
                                 num_samples=d + 1, metadata={"encoder_id": enc.encoder_id})
            losses[name] = FDLoss(ref, build_population("ema", d, beta=settings.fd_ema_beta, device="cpu"))
        fd_loss = MultiEncoderFDLoss(losses)
        # population buffers, plus the reference's mean, covariance and its cached square-root factor (float64)
        fd_state = sum(t.numel() * t.element_size() for t in fd_loss.buffers())
        fd_state += sum(8 * (enc.feature_dim + 2 * enc.feature_dim**2) for enc in encoders.values())
        fd_math = {b: _measure_fd_math(fd_loss, {n: e.feature_dim for n, e in encoders.items()}, b) for b in batches}

    plan = Plan(settings, pipe.family, int(resolution), weights, sum(p.numel() for p in trainable), int(fd_state))
    from .training.sharding import denoiser_block_classes

    blocks = set(denoiser_block_classes(denoiser))
    units = [m for m in denoiser.modules() if type(m).__name__ in blocks]
    plan.block_bytes = max(_unit_bytes(m, units) for m in units)
    plan.block_grad_bytes = max(_unit_bytes(m, units, trainable_grads=True) for m in units)
    plan.root_bytes = _unit_bytes(denoiser, units) + _unit_bytes(denoiser, units, trainable_grads=True)
    if pipe.is_text_conditional:
        example = pipe.example_conditioning(1, device="cpu", dtype=weight_dtype)
        plan.prompt_bytes = sum(t.numel() * t.element_size() for t in vars(example).values()
                                if isinstance(t, torch.Tensor))
    for p in trainable:  # gradients exist before the step: the step's transient memory excludes them
        p.grad = torch.zeros_like(p)
    for batch in batches:
        cond = pipe.example_conditioning(batch, device="cpu", dtype=weight_dtype)
        plan.steps[batch] = _measure_step(gen, denoiser, encoders, fd_math[batch], cond, batch, settings, pipe)
    for p in trainable:
        p.grad = None
    return plan


_FD_MATH_CACHE: dict = {}
# The FD math runs on real tensors: above this many rows it is extrapolated (_measure_fd_math).
FD_MATH_MAX_BATCH = 512
# Batches every plan runs besides --batch_size: the largest batch is extrapolated through the two largest.
PLANNED_BATCHES = (1, 2, 8)


def real_step_in_subprocess(settings: PlanSettings, batch: int) -> StepMeasure:
    """The step of ``settings`` at ``batch`` on real CPU tensors, in a fresh Python process (Linux): its peak
    resident memory is not hidden by memory an earlier run in this process freed but kept."""
    import dataclasses
    import subprocess
    import sys

    code = ("import json, sys, dataclasses; from fd_onestep.plan import PlanSettings, make_plan; "
            "s = PlanSettings(**json.loads(sys.argv[1])); b = int(sys.argv[2]); "
            "m = make_plan(s, fake=False, batches=[b]).steps[b]; print('STEP' + json.dumps(dataclasses.asdict(m)))")
    fields = dataclasses.asdict(settings)
    fields["encoders"] = list(fields["encoders"])
    out = subprocess.run([sys.executable, "-c", code, json.dumps(fields), str(batch)], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("STEP")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"the real step failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return StepMeasure(**json.loads(lines[-1][4:]))


def _measure_fd_math(fd_loss, dims: dict, batch: int) -> tuple[int, int]:
    """(transient peak bytes, FLOPs) of the FD-loss forward and backward on (batch, d) features, run for real
    (once per feature dimensions and batch in a process: it depends on nothing else). Above
    :data:`FD_MATH_MAX_BATCH` rows it is run at that batch and its half and extrapolated along their line (the
    features and their gradient grow linearly in the batch; the d x d math does not), so that no batch makes the
    plan allocate (batch 10^6 x d 2048 would be 16 GB of features)."""
    if batch > FD_MATH_MAX_BATCH:
        half, full = FD_MATH_MAX_BATCH // 2, FD_MATH_MAX_BATCH
        (m1, f1), (m2, f2) = _measure_fd_math(fd_loss, dims, half), _measure_fd_math(fd_loss, dims, full)
        scale = (batch - full) / (full - half)
        return int(m2 + (m2 - m1) * scale), int(f2 + (f2 - f1) * scale)
    key = (tuple(sorted(dims.items())), batch)
    if key not in _FD_MATH_CACHE:
        _FD_MATH_CACHE[key] = _run_fd_math(fd_loss, dims, batch)
    return _FD_MATH_CACHE[key]


def _run_fd_math(fd_loss, dims: dict, batch: int) -> tuple[int, int]:
    gen = torch.Generator().manual_seed(batch)
    feats = {n: torch.randn(max(batch, 2), d, generator=gen, requires_grad=True) for n, d in dims.items()}
    counter, live = _flop_counter(), LiveBytes()
    with counter, live:
        loss, _ = fd_loss(feats, update=False)
        loss.backward()
    return int(live.peak), int(counter.get_total_flops() * batch / max(batch, 2))


def _measure_step(gen, denoiser, encoders, fd_math, cond, batch, settings, pipe) -> StepMeasure:
    counter = _flop_counter()
    parts = _Parts(counter)
    parts.watch(denoiser, "denoiser")
    vae_decoder = getattr(pipe.vae, "decoder", pipe.vae) if pipe.is_latent else None
    if vae_decoder is not None:
        parts.watch(vae_decoder, "decode (VAE)")
    if gen.decode_savers.surrogate is not None:
        parts.watch(getattr(gen.decode_savers.surrogate, "decoder", gen.decode_savers.surrogate), "decode (tiny, gradient)")
    for name, enc in encoders.items():
        parts.watch(enc, f"encoder {name}")
    noise = gen.sample_noise(batch, device="cpu")
    rss = _ResidentMemory() if not _ACTIVE_FAKE_MODE else None
    allocated = _AllocatedMemory() if rss is not None else None
    live = LiveBytes()
    dtype = _dtype(settings.mixed_precision)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    try:
        with counter, live:
            with torch.autograd.graph.saved_tensors_hooks(parts.pack, lambda t: t):
                with autocast:
                    images = gen(denoiser, noise, cond).float()
                features = [enc(images.clamp(-1.0, 1.0)) for enc in encoders.values()]
            parts._charge(parts.stack[-1])
            held = live.current  # everything the backward needs, when the FD math runs
            parts.in_backward = True
            parts.stack = ["FD math"]
            torch.autograd.backward(features, [torch.ones_like(f) for f in features])
            parts._charge(parts.stack[-1])
        rss_delta = rss.peak_delta() if rss is not None else None
    finally:
        allocated_peak = allocated.peak_delta() if allocated is not None else None
        parts.remove()
    seconds = None
    if rss is not None:  # a real run: the same step again, timed without the counters
        import time

        start = time.perf_counter()
        with autocast:
            images = gen(denoiser, noise, cond).float()
        features = [enc(images.clamp(-1.0, 1.0)) for enc in encoders.values()]
        torch.autograd.backward(features, [torch.ones_like(f) for f in features])
        seconds = time.perf_counter() - start
    fd_peak, fd_flops = fd_math
    saved = {k: v for k, v in parts.saved.items() if v}
    flops = {k: v for k, v in parts.flops.items() if v and k != "FD math"}
    flops["FD math"] = fd_flops
    return StepMeasure(batch, int(max(live.peak, held + fd_peak)), saved, flops, rss_delta=rss_delta,
                       allocated_peak=allocated_peak, seconds=seconds)


def plan_table_rows(plans: dict) -> list[str]:
    """README rows: one per (family, LoRA/full, savers)."""
    rows = []
    for (name, lora, savers), plan in plans.items():
        rows.append(
            f"| {name} | {plan.resolution} | {'LoRA' if lora else 'full'} | {savers} | {plan.peak(1) / 1e9:.1f} | "
            f"{plan.peak(8) / 1e9:.1f} | {plan.max_batch()} |")
    return rows
