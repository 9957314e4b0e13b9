"""Prompt embeddings on disk: every distinct prompt encoded once, by all processes together, memory-mapped by each.

Why: an in-memory cache costs every process ``N x (L x D + P) x bytes`` of host memory (SD3 in bf16: about 2.7 MB
per prompt, 135 GB for 50,000 prompts, times the processes of a node), and keeps the text encoders loaded for a
cache that never changes. A :class:`PromptStore` is a folder of safetensors shards of ``shard_size`` distinct
prompts each (one tensor per ``OneStepConditioning`` field) and a ``manifest.json``:

- :meth:`PromptStore.build` splits the shards over the processes (``accelerator.split_between_processes``); each
  process encodes its shards, ``chunk_size`` prompts per text-encoder call, and writes each shard atomically
  (temporary name, ``os.replace``), so host memory while encoding is one shard, whatever the number of prompts;
- every process then opens the shards memory-mapped (``safetensors.safe_open``): a step reads only its rows, and
  the pages are the operating system's file cache, shared by the processes of a node;
- the store is reused, never rebuilt, when its manifest names the same prompts and text encoders (a digest of the
  distinct prompts in order, and :func:`text_encoder_digest`: classes, configs, tokenizers and a fingerprint of
  the weights): a resumed run and a second run with the same prompts skip encoding; the same folder with other
  prompts or encoders is refused with the fix (a finished shard of an interrupted build is kept and reused).

:func:`offload_text_encoders` then takes the text encoders off the device for the rest of the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from fd_onestep.pipelines.pipeline_fd_onestep import OneStepConditioning

logger = logging.getLogger(__name__)

__all__ = ["PromptStore", "prompts_digest", "text_encoder_digest", "offload_text_encoders", "text_encoder_names",
           "PROMPT_STORE_MANIFEST", "PromptStoreMismatch"]

PROMPT_STORE_MANIFEST = "manifest.json"
DEFAULT_SHARD_SIZE = 1024


class PromptStoreMismatch(ValueError):
    """The folder holds the embeddings of other prompts or other text encoders."""


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 of the distinct prompts in first-seen order (JSON, so newlines inside a prompt cannot collide)."""
    return hashlib.sha256(json.dumps(list(dict.fromkeys(prompts))).encode()).hexdigest()


def _tensor_fingerprint(t: torch.Tensor) -> list:
    flat = t.detach().reshape(-1).to("cpu", torch.float64)
    stride = max(1, flat.numel() // 4096)
    return [str(t.dtype), list(t.shape), float(flat.sum()), float(flat.abs().sum()), flat[::stride].tolist()]


def text_encoder_digest(pipeline, extra: dict | None = None) -> str:
    """sha256 identifying what the prompt embeddings depend on: each text encoder's class, config and weights
    (per tensor: dtype, shape, sum, sum of magnitudes and up to 4096 evenly spaced values, so two checkpoints of
    one architecture differ without hashing every byte of a 9.5 GB T5), each tokenizer's class, vocabulary size and
    maximum length, and ``extra`` (encoding settings such as ``max_sequence_length``)."""
    h = hashlib.sha256()
    for name in text_encoder_names(pipeline, tokenizers=True):
        component = getattr(pipeline, name, None)
        if component is None:
            h.update(f"{name}:None".encode())
            continue
        h.update(f"{name}:{type(component).__name__}".encode())
        if isinstance(component, torch.nn.Module):
            config = getattr(component, "config", None)
            h.update((config.to_json_string() if hasattr(config, "to_json_string") else repr(config)).encode())
            for key, tensor in component.state_dict().items():
                h.update(json.dumps([key, *_tensor_fingerprint(tensor)]).encode())
        else:  # a tokenizer, or a processor (FLUX.2-dev's PixtralProcessor): its text tokenizer
            tokenizer = text_tokenizer(component)
            h.update(json.dumps([len(tokenizer), getattr(tokenizer, "model_max_length", None)]).encode())
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def text_tokenizer(component):
    """The text tokenizer of a pipeline's ``tokenizer`` component: itself, or a processor's (a multimodal
    processor such as FLUX.2-dev's ``PixtralProcessor`` takes images first and has no length)."""
    if getattr(component, "image_processor", None) is not None and hasattr(component, "tokenizer"):
        return component.tokenizer
    return component


def text_encoder_names(pipeline, tokenizers: bool = False) -> list[str]:
    """The pipeline's text-encoder components that are present (``text_encoder``, ``text_encoder_2``, ...; with
    ``tokenizers`` also the tokenizers), in name order."""
    prefixes = ("text_encoder", "tokenizer") if tokenizers else ("text_encoder",)
    components = getattr(pipeline, "components", {})
    return sorted(n for n, c in components.items() if n.startswith(prefixes) and c is not None)


def offload_text_encoders(pipeline, device: str | torch.device = "cpu") -> list[str]:
    """Move the text encoders off the accelerator once every prompt is encoded; returns their names.

    ``device="cpu"`` keeps them in host memory (the final pipeline is saved with them); ``"meta"`` frees them
    altogether (their weights are gone: save the final pipeline from the teacher's files). The accelerator's cache
    is emptied so the memory returns to the other uses of the run.
    """
    moved = []
    for name in text_encoder_names(pipeline):
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            module.to(device)
            moved.append(name)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return moved


def _fields(cond: OneStepConditioning) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(cond).items() if isinstance(v, torch.Tensor)}


class PromptStore:
    """Read-only, memory-mapped embeddings of distinct prompts (see the module docstring). Build with :meth:`build`.

    ``store[rows]`` (a (B,) int64 CPU tensor of rows) is a ``OneStepConditioning`` of B rows on the CPU, read from
    the shards; ``store.row_of[prompt]`` is a prompt's row. ``len(store)``: the number of distinct prompts.
    """

    def __init__(self, folder: str | os.PathLike, manifest: dict, prompts: list[str]):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.manifest = manifest
        self.shard_size = int(manifest["shard_size"])
        self.row_of: dict[str, int] = {p: i for i, p in enumerate(prompts)}
        self._files = [safe_open(str(self.folder / name), framework="pt", device="cpu") for name in manifest["shards"]]
        self._fields = list(manifest["fields"])

    def __len__(self) -> int:
        return int(self.manifest["num_prompts"])

    @property
    def nbytes(self) -> int:
        """Bytes of all embeddings on disk (what an in-memory cache would hold in every process)."""
        return int(self.manifest["nbytes"])

    def __getitem__(self, rows) -> OneStepConditioning:
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        out = {}
        for field in self._fields:
            parts = []
            for r in rows.tolist():
                shard, offset = divmod(r, self.shard_size)
                parts.append(self._files[shard].get_slice(field)[offset:offset + 1])
            out[field] = torch.cat(parts)
        return OneStepConditioning(**out)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        folder: str | os.PathLike,
        prompts: Sequence[str],
        encode: Callable[[list[str]], OneStepConditioning],
        *,
        encoders_digest: str,
        accelerator=None,
        chunk_size: int = 32,
        shard_size: int = DEFAULT_SHARD_SIZE,
    ) -> "PromptStore":
        """Encode the distinct ``prompts`` into ``folder`` (or reuse what is there), then open it. Call on every process.

        Args:
            folder: the store's folder (``<output_dir>/prompt_embeddings`` or ``--prompt_embeddings_dir``).
            prompts: the prompts (repeats allowed; each distinct prompt is stored once, in first-seen order).
            encode: list of prompts -> their conditioning rows (the pipeline's ``encode_conditioning``).
            encoders_digest: :func:`text_encoder_digest` of the pipeline whose ``encode`` this is.
            accelerator: splits the shards over the processes and waits for all of them; None: one process.
            chunk_size: prompts per ``encode`` call (bounds the text encoders' activations).
            shard_size: distinct prompts per file (bounds each process's host memory while encoding).
        Raises:
            PromptStoreMismatch: ``folder`` holds a store of other prompts or other text encoders.
        """
        from fd_onestep.onestep import encode_in_chunks

        distinct = list(dict.fromkeys(prompts))
        if not distinct:
            raise ValueError("no prompts to encode; pass at least one prompt.")
        folder = Path(folder)
        digest = prompts_digest(distinct)
        manifest_path = folder / PROMPT_STORE_MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            cls._check(manifest, folder, digest, encoders_digest)
            logger.info("prompt embeddings: reusing %s (%d prompts)", folder, len(distinct))
            return cls(folder, manifest, distinct)

        main = accelerator is None or accelerator.is_main_process
        if main:
            folder.mkdir(parents=True, exist_ok=True)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        num_shards = (len(distinct) + shard_size - 1) // shard_size
        names = [f"embeddings-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
        shard_ids = list(range(num_shards))
        if accelerator is not None and accelerator.num_processes > 1:
            with accelerator.split_between_processes(shard_ids) as mine:
                mine = list(mine)
        else:
            mine = shard_ids
        from safetensors import safe_open
        from safetensors.torch import save_file

        for i in mine:
            chunk = distinct[i * shard_size:(i + 1) * shard_size]
            meta = {"prompts_sha256": prompts_digest(chunk), "encoders": encoders_digest}
            path = folder / names[i]
            if path.is_file():  # a finished shard of an interrupted build
                try:
                    with safe_open(str(path), framework="pt") as f:
                        if f.metadata() == meta:
                            continue
                except Exception:
                    pass
            tensors = _fields(encode_in_chunks(encode, chunk, chunk_size))
            tmp = folder / f".{names[i]}.partial"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
            os.replace(tmp, path)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if main:
            fields, nbytes = None, 0
            for name in names:
                with safe_open(str(folder / name), framework="pt") as f:
                    fields = sorted(f.keys())
                    for key in fields:
                        s = f.get_slice(key)
                        nbytes += int(torch.Size(s.get_shape()).numel()) * _dtype_bytes(s.get_dtype())
            manifest = {"prompts_sha256": digest, "encoders": encoders_digest, "num_prompts": len(distinct),
                        "shard_size": shard_size, "shards": names, "fields": fields, "nbytes": nbytes}
            tmp = folder / f".{PROMPT_STORE_MANIFEST}.partial"
            tmp.write_text(json.dumps(manifest, indent=2))
            os.replace(tmp, manifest_path)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        manifest = json.loads(manifest_path.read_text())
        logger.info("prompt embeddings: %d prompts encoded into %s (%.1f MiB on disk)", len(distinct), folder,
                    manifest["nbytes"] / 2**20)
        return cls(folder, manifest, distinct)

    @staticmethod
    def _check(manifest: dict, folder: Path, digest: str, encoders_digest: str) -> None:
        if manifest.get("prompts_sha256") != digest:
            raise PromptStoreMismatch(
                f"{folder} holds the prompt embeddings of other prompts ({manifest.get('num_prompts')} prompts, a "
                "different list): the prompts file changed since it was written. Pass the original prompts, or "
                "another --prompt_embeddings_dir (or a fresh --output_dir) for the new ones."
            )
        if manifest.get("encoders") != encoders_digest:
            raise PromptStoreMismatch(
                f"{folder} holds prompt embeddings of other text encoders (or other encoding settings, e.g. "
                "--max_sequence_length): pass another --prompt_embeddings_dir for this model."
            )


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1}.get(name, 4)
