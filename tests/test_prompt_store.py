"""Prompt embeddings on disk: encoded once (split over processes), memory-mapped, reused by content, refused when
the prompts or the text encoders changed; the text encoders leave the device once the prompts are encoded."""

import inspect
import json
import subprocess
import sys

import pytest
import torch
from tiny_teachers import TEACHERS
from train_fixtures import REPO_ROOT, SUBPROCESS_ENV

from fd_onestep import FDOneStepPipeline, OneStepGenerator
from fd_onestep.prompt_store import (PromptStore, PromptStoreMismatch, offload_text_encoders, text_encoder_digest,
                                     text_encoder_names)

PROMPTS = ["a red square", "a blue circle", "a green cat", "two cats", "a red square", "the sea", "a big house"]


def _sd_pipeline():
    torch.manual_seed(0)
    teacher = TEACHERS["sd"]()
    accepted = set(inspect.signature(FDOneStepPipeline.__init__).parameters)
    return FDOneStepPipeline(**{k: v for k, v in teacher.components.items() if k in accepted})


def _counting_encoder(pipe, calls):
    def encode(chunk):
        calls.append(list(chunk))
        return pipe.encode_conditioning(prompt=chunk, device="cpu")
    return encode


def test_the_store_holds_the_in_memory_cache_rows_and_the_generator_draws_the_same_conditioning(tmp_path):
    pipe = _sd_pipeline()
    cached = OneStepGenerator(pipe, prompts=PROMPTS, prompt_chunk_size=2)
    store = PromptStore.build(tmp_path / "store", PROMPTS, _counting_encoder(pipe, []),
                              encoders_digest=text_encoder_digest(pipe), chunk_size=2, shard_size=4)
    assert len(store) == 6 and len(list((tmp_path / "store").glob("embeddings-*.safetensors"))) == 2
    stored = OneStepGenerator(pipe, prompts=PROMPTS, prompt_store=store)
    rows = torch.arange(6)
    assert torch.equal(store[rows].prompt_embeds, cached.prompt_embeddings[rows].prompt_embeds)
    a = cached.sample_conditioning(5, generator=torch.Generator().manual_seed(1))
    b = stored.sample_conditioning(5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.prompt_embeds, b.prompt_embeds)


def test_a_second_build_reuses_the_store_and_other_prompts_or_encoders_are_refused(tmp_path):
    pipe, calls = _sd_pipeline(), []
    digest = text_encoder_digest(pipe)
    PromptStore.build(tmp_path, PROMPTS, _counting_encoder(pipe, calls), encoders_digest=digest, shard_size=4)
    assert sum(len(c) for c in calls) == 6  # each distinct prompt once
    calls.clear()
    PromptStore.build(tmp_path, PROMPTS, _counting_encoder(pipe, calls), encoders_digest=digest, shard_size=4)
    assert calls == []  # a resumed run, or a second run with the same prompts and encoders: nothing re-encoded
    with pytest.raises(PromptStoreMismatch, match="the prompts file changed"):
        PromptStore.build(tmp_path, [*PROMPTS, "a new prompt"], _counting_encoder(pipe, calls), encoders_digest=digest)
    with torch.no_grad():
        next(pipe.text_encoder.parameters()).view(-1)[0].add_(1e-3)  # another checkpoint of the same encoder
    with pytest.raises(PromptStoreMismatch, match="other text encoders"):
        PromptStore.build(tmp_path, PROMPTS, _counting_encoder(pipe, calls), encoders_digest=text_encoder_digest(pipe))
    assert calls == []


def test_the_text_encoders_are_off_the_device_after_encoding_and_training_draws_from_the_store(tmp_path):
    pipe = _sd_pipeline()
    store = PromptStore.build(tmp_path, PROMPTS, _counting_encoder(pipe, []), encoders_digest=text_encoder_digest(pipe))
    gen = OneStepGenerator(pipe, prompts=PROMPTS, prompt_store=store, device="cpu")
    assert offload_text_encoders(pipe, device="meta") == text_encoder_names(pipe) == ["text_encoder"]
    assert all(p.device.type == "meta" for p in pipe.text_encoder.parameters())  # freed, not on the device
    noise = gen.sample_noise(2, generator=torch.Generator().manual_seed(0))
    images = gen(None, noise, gen.sample_conditioning(2, generator=torch.Generator().manual_seed(0)))
    assert images.shape[0] == 2 and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="not in the prompt store"):
        gen.encode_prompts(["a prompt never stored"])


@pytest.mark.slow
@pytest.mark.distributed
def test_twenty_thousand_prompts_are_encoded_once_across_two_processes_in_bounded_host_memory(tmp_path):
    """Each process encodes about half of the 20,000 distinct prompts and adds a bounded amount of host memory
    (measured: 9 to 26 MB per process, varying between runs, for a store of 123 MB; one shard of 512 prompts is
    encoded at a time, and the shards are read memory-mapped), and a second build over the folder (a resumed run) encodes nothing."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", "--multi_gpu",
           str(REPO_ROOT / "tests" / "prompt_store_worker.py"), str(tmp_path / "store"), str(tmp_path / "result")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1)]
    assert sum(r["encoded"] for r in results) == 20_000 and all(r["encoded"] > 9_000 for r in results)
    assert all(r["encoded_again"] == 0 and r["num_prompts"] == 20_000 and r["row_0_equal"] for r in results)
    for r in results:
        # an in-memory cache would add the whole store (123 MB) to every process
        assert r["peak_added_bytes"] < r["store_bytes"] / 3, r
