"""OneStepGenerator: the training-side adapter around FDOneStepPipeline."""

from __future__ import annotations

import contextlib
import copy
import inspect

import pytest
import torch
from test_pipeline_tiny_models import FAMILY_KWARGS, TEACHERS

from fd_onestep.onestep import PROMPT_CHUNK_SIZE, OneStepConditioning, OneStepGenerator, add_lora_to_denoiser
from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

pytestmark = pytest.mark.filterwarnings("ignore:ill-conditioned one-step map")
_SIGNATURE = set(inspect.signature(FDOneStepPipeline.__init__).parameters)


def pipeline(family, **settings) -> FDOneStepPipeline:
    torch.manual_seed(0)
    teacher = TEACHERS[family]()
    components = {k: v for k, v in teacher.components.items() if k in _SIGNATURE}
    return FDOneStepPipeline(**components, **{**FAMILY_KWARGS.get(family, {}), **settings})


def test_generator_shapes_for_the_offline_default_teacher():
    gen = OneStepGenerator(pipeline("unet2d"))
    assert gen.family == "unet2d" and gen.noise_shape == (1, 16, 16) and gen.image_shape == (1, 16, 16)
    assert not gen.is_class_conditional and not gen.is_text_conditional
    noise = gen.sample_noise(4, generator=torch.Generator().manual_seed(0))
    assert noise.shape == (4, 1, 16, 16) and noise.dtype == torch.float32
    assert torch.equal(noise, gen.sample_noise(4, generator=torch.Generator().manual_seed(0)))
    assert gen.sample_conditioning(4) is None


def test_forward_matches_the_pipeline_and_is_differentiable():
    pipe = pipeline("unet2d")
    gen = OneStepGenerator(pipe)
    noise = gen.sample_noise(2, generator=torch.Generator().manual_seed(1))
    images = gen(gen.denoiser, noise)
    assert images.shape == (2, 1, 16, 16) and images.requires_grad
    expected = pipe(latents=noise, output_type="latent").images
    torch.testing.assert_close(images.detach(), expected, rtol=0, atol=0)
    images.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.denoiser.parameters())


def test_forward_runs_the_denoiser_passed_in_not_the_pipelines():
    gen = OneStepGenerator(pipeline("unet2d"))
    trained = copy.deepcopy(gen.denoiser)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05)
    noise = gen.sample_noise(2)
    assert not torch.allclose(gen(trained, noise), gen(None, noise))
    # a DDP-style wrapper (module attribute) is called as is: its forward is the model's
    wrapper = torch.nn.Module()
    wrapper.module = trained
    wrapper.forward = lambda *a, **k: trained(*a, **k)
    torch.testing.assert_close(gen(wrapper, noise), gen(trained, noise), rtol=0, atol=0)


def test_latent_family_decodes_through_the_frozen_vae():
    gen = OneStepGenerator(pipeline("sd", timestep=500), prompts=["a cab", "dog", "zz"])
    assert gen.noise_shape == (4, 8, 8) and gen.image_shape == (3, 16, 16)
    assert all(not p.requires_grad for p in gen.pipeline.vae.parameters())
    assert all(not p.requires_grad for p in gen.pipeline.text_encoder.parameters())
    noise = gen.sample_noise(3)
    cond = gen.sample_conditioning(3, generator=torch.Generator().manual_seed(0))
    images = gen(gen.denoiser, noise, cond)
    assert images.shape == (3, 3, 16, 16) and images.requires_grad
    images.sum().backward()
    assert all(p.grad is None for p in gen.pipeline.vae.parameters())


def test_prompt_embeddings_are_cached_and_match_the_pipeline():
    pipe = pipeline("sd3")
    gen = OneStepGenerator(pipe, prompts=["a cab", "dog"])
    calls = []
    original = pipe.text_encoder.forward
    pipe.text_encoder.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    cond = gen.sample_conditioning(8, generator=torch.Generator().manual_seed(0))
    assert calls == []  # every prompt was encoded once, at construction
    assert isinstance(cond, OneStepConditioning) and len(cond) == 8
    assert cond.prompt_embeds.shape[0] == 8 and cond.pooled_prompt_embeds.shape == (8, 32)
    direct = pipe.encode_conditioning(prompt=["dog"], device="cpu")
    cached = gen.encode_prompts(["dog"])
    # encoded in a batch of two at construction vs alone here: equal up to float32 batching noise
    torch.testing.assert_close(cached.prompt_embeds, direct.prompt_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached.pooled_prompt_embeds, direct.pooled_prompt_embeds, rtol=0, atol=1e-6)


def test_class_labels_follow_the_given_histogram():
    gen = OneStepGenerator(pipeline("dit"), class_histogram=[0, 0, 1, 0, 0, 0, 0, 0, 0, 3])
    labels = gen.sample_conditioning(4000, generator=torch.Generator().manual_seed(0)).class_labels
    assert labels.dtype == torch.long and set(labels.tolist()) == {2, 9}
    assert abs((labels == 9).float().mean().item() - 0.75) < 0.03
    uniform = OneStepGenerator(pipeline("dit")).sample_conditioning(5000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(uniform.class_labels, minlength=10).float() / 5000
    assert counts.min() > 0.07 and counts.max() < 0.13


def test_guided_training_forward_uses_negative_embeddings():
    gen = OneStepGenerator(pipeline("sd", guidance_scale=3.0, timestep=500), prompts=["cab"])
    cond = gen.sample_conditioning(2)
    assert cond.negative_prompt_embeds is not None and cond.negative_prompt_embeds.shape == cond.prompt_embeds.shape
    assert gen(gen.denoiser, gen.sample_noise(2), cond).shape == (2, 3, 16, 16)


def test_bad_inputs_name_the_fix():
    with pytest.raises(TypeError, match="FDOneStepPipeline"):
        OneStepGenerator(object())
    with pytest.raises(ValueError, match="not text-conditioned"):
        OneStepGenerator(pipeline("unet2d"), prompts=["a"])
    with pytest.raises(ValueError, match="one weight per class"):
        OneStepGenerator(pipeline("dit"), class_histogram=[1, 2])
    with pytest.raises(ValueError, match="pass `prompts=\\[...\\]`"):
        OneStepGenerator(pipeline("sd", timestep=500)).sample_conditioning(2)
    with pytest.raises(ValueError, match="latents must have shape"):
        gen = OneStepGenerator(pipeline("unet2d"))
        gen(None, torch.zeros(2, 3, 16, 16))


def test_save_pipeline_merges_a_trained_lora_into_a_full_model(tmp_path):
    gen = OneStepGenerator(pipeline("unet2d"))
    base = copy.deepcopy(gen.denoiser)
    add_lora_to_denoiser(gen.denoiser, rank=2)
    with torch.no_grad():
        for name, p in gen.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    noise = gen.sample_noise(2, generator=torch.Generator().manual_seed(0))
    expected = gen(None, noise).detach()
    gen.save_pipeline(tmp_path / "full")
    loaded = FDOneStepPipeline.from_pretrained(tmp_path / "full")
    assert not any("lora" in n for n, _ in loaded.unet.named_parameters())
    torch.testing.assert_close(loaded(latents=noise, output_type="latent").images, expected, rtol=0, atol=1e-5)
    # the live training model keeps its adapter
    assert any("lora_A" in n for n, _ in gen.denoiser.named_parameters())

    lora_file = gen.save_lora(tmp_path / "lora")
    fresh = pipeline("unet2d")
    fresh.register_modules(unet=base)
    fresh.load_lora_weights(lora_file)
    torch.testing.assert_close(fresh(latents=noise, output_type="latent").images, expected, rtol=0, atol=1e-5)


def test_save_pipeline_with_a_separately_trained_denoiser(tmp_path):
    gen = OneStepGenerator(pipeline("dit", timestep=500), class_histogram=[1] * 10)
    trained = copy.deepcopy(gen.denoiser)
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(1.01)
    noise = gen.sample_noise(2)
    cond = OneStepConditioning(class_labels=torch.tensor([1, 5]))
    expected = gen(trained, noise, cond).detach()
    gen.save_pipeline(tmp_path, denoiser=trained)
    loaded = FDOneStepPipeline.from_pretrained(tmp_path)
    assert loaded.config.timestep == 500
    out = loaded(class_labels=[1, 5], latents=noise, output_type="pt").images
    torch.testing.assert_close(out, (expected / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ scale and precision
def test_a_large_caption_set_is_encoded_in_chunks_and_cached_on_the_cpu():
    """20,000 captions: every text-encoder call sees at most ``prompt_chunk_size`` prompts, each distinct prompt
    is encoded once, the cache lives on the CPU and only a step's sampled rows move to the requested device.
    (A chunk of 500 keeps this test fast on 2 cores; the default, PROMPT_CHUNK_SIZE, is sized for T5-XXL.)"""
    chunk = 500
    pipe = pipeline("sd", timestep=500)
    distinct = [f"cat {i}" for i in range(19_000)]
    captions = distinct + distinct[:1_000]  # captions datasets repeat captions
    calls, encoder_batches = [], []
    encode = pipe.encode_conditioning
    pipe.encode_conditioning = lambda **kw: calls.append((len(kw["prompt"]), kw["device"])) or encode(**kw)
    original = pipe.text_encoder.forward
    pipe.text_encoder.forward = lambda input_ids, *a, **k: encoder_batches.append(len(input_ids)) or original(
        input_ids, *a, **k)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads on 2 shared cores only oversubscribe (5x slower)
    try:
        gen = OneStepGenerator(pipe, prompts=captions, prompt_chunk_size=chunk)
    finally:
        torch.set_num_threads(threads)
    assert max(n for n, _ in calls) <= chunk and max(encoder_batches) <= chunk
    assert sum(n for n, _ in calls) == len(distinct)  # each distinct caption encoded once
    assert {device for _, device in calls} == {gen.device}  # the encoders run where the generator runs
    cache = gen.prompt_embeddings
    assert len(cache) == len(distinct) and cache.prompt_embeds.device.type == "cpu"
    calls.clear()
    cond = gen.sample_conditioning(64, generator=torch.Generator().manual_seed(0), device="meta")
    assert calls == [] and len(cond) == 64 and cond.prompt_embeds.device.type == "meta"
    assert cond.prompt_embeds.shape[1:] == cache.prompt_embeds.shape[1:]
    # the rows are the prompts' own embeddings: the same draw on the CPU against encoding the prompts directly
    cpu = gen.sample_conditioning(3, generator=torch.Generator().manual_seed(1), device="cpu")
    index = torch.randint(len(captions), (3,), generator=torch.Generator().manual_seed(1))
    direct = encode(prompt=[captions[i] for i in index.tolist()], device="cpu")
    torch.testing.assert_close(cpu.prompt_embeds, direct.prompt_embeds, rtol=0, atol=1e-6)


def test_prompts_added_later_are_encoded_in_chunks_and_appended_to_the_cache():
    assert 1 <= PROMPT_CHUNK_SIZE <= 64  # bounded device memory for T5-XXL (module docstring)
    gen = OneStepGenerator(pipeline("sd", timestep=500), prompts=["a cab", "dog"], prompt_chunk_size=2)
    more = gen.encode_prompts(["dog", "x1", "x2", "x3"], device="cpu")
    assert len(gen.prompt_embeddings) == 5 and len(more) == 4
    torch.testing.assert_close(more[0].prompt_embeds, gen.encode_prompts(["dog"]).prompt_embeds, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast-bf16", "no-autocast"])
def test_bf16_lora_step_frozen_parts_in_bf16_lora_parameters_in_float32(autocast):
    """Mixed precision as diffusers' LoRA examples: VAE, text encoder and the denoiser's base weights in bf16, the
    trainable LoRA parameters in float32; the step's images come back float32 and the gradient is finite."""
    gen = OneStepGenerator(pipeline("sd", timestep=500), prompts=["a cab", "dog"], weight_dtype=torch.bfloat16)
    for name in ("vae", "text_encoder"):
        assert {p.dtype for p in getattr(gen.pipeline, name).parameters()} == {torch.bfloat16}
    assert gen.prompt_embeddings.prompt_embeds.dtype == torch.bfloat16  # half the cache's host memory
    denoiser = gen.add_lora(rank=4)
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    frozen = [p for p in denoiser.parameters() if not p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    g = torch.Generator().manual_seed(0)
    noise, cond = gen.sample_noise(2, generator=g), gen.sample_conditioning(2, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        images = gen(denoiser, noise, cond)
    assert images.dtype == torch.float32 and images.shape == (2, 3, 16, 16)
    images.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in frozen)


def test_weight_dtype_leaves_a_fully_fine_tuned_denoiser_in_float32():
    gen = OneStepGenerator(pipeline("sd", timestep=500), prompts=["a cab"], weight_dtype=torch.bfloat16)
    assert {p.dtype for p in gen.denoiser.parameters()} == {torch.float32}
    assert {p.dtype for p in gen.pipeline.vae.parameters()} == {torch.bfloat16}
    gen.denoiser.requires_grad_(True)
    images = gen(gen.denoiser, gen.sample_noise(1), gen.sample_conditioning(1))  # bf16 embeddings, bf16 VAE
    assert images.dtype == torch.float32
    images.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in gen.denoiser.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="floating torch.dtype"):
        OneStepGenerator(pipeline("unet2d"), weight_dtype="bf16")


def test_add_lora_without_weight_dtype_casts_nothing():
    gen = OneStepGenerator(pipeline("unet2d"))
    denoiser = gen.add_lora(rank=2)
    assert {p.dtype for p in denoiser.parameters()} == {torch.float32}
    assert any(p.requires_grad for p in denoiser.parameters())


def test_prompts_with_labels_carry_them_and_can_be_drawn_by_the_class_they_name():
    prompts = ["a cab", "dog", "two cabs", "a dog"]
    gen = OneStepGenerator(pipeline("sd"), prompts=prompts, prompt_labels=[0, 1, 0, 1])
    assert gen.labeled and gen.num_label_classes == 2 and not gen.is_class_conditional
    drawn = gen.sample_conditioning(64, generator=torch.Generator().manual_seed(0))
    by_prompt = {p: gen.encode_prompts([p]).prompt_embeds[0] for p in prompts}
    for row, label in zip(drawn.prompt_embeds, drawn.class_labels.tolist()):
        # each row's label is the one of the prompt it embeds
        assert any(torch.equal(row, by_prompt[p]) for p, c in zip(prompts, [0, 1, 0, 1]) if c == label)
    asked = gen.conditioning_for_labels(torch.tensor([1, 0, 1, 1, 0]), generator=torch.Generator().manual_seed(1))
    assert asked.class_labels.tolist() == [1, 0, 1, 1, 0]
    for row, label in zip(asked.prompt_embeds, asked.class_labels.tolist()):
        assert any(torch.equal(row, by_prompt[p]) for p, c in zip(prompts, [0, 1, 0, 1]) if c == label)
    with pytest.raises(ValueError, match="no prompt names class 2"):
        gen.conditioning_for_labels(torch.tensor([2]))
    with pytest.raises(ValueError, match="one class >= 0 per prompt"):
        OneStepGenerator(pipeline("sd"), prompts=prompts, prompt_labels=[0, 1])
    with pytest.raises(ValueError, match="together with `prompts`"):
        OneStepGenerator(pipeline("sd"), prompt_labels=[0])


def test_num_label_classes_counts_the_model_classes_or_the_labeled_prompts_classes():
    from fd_onestep.onestep import num_label_classes

    assert num_label_classes(pipeline("unet2d")) is None  # unconditional
    assert num_label_classes(pipeline("sd")) is None  # prompts without labels
    assert num_label_classes(pipeline("sd"), [0, 3, 1]) == 4  # classes 0..3, whichever the prompts name
    gen = OneStepGenerator(pipeline("sd"), prompts=["a", "b"], prompt_labels=[0, 3])
    assert gen.num_label_classes == num_label_classes(gen.pipeline, [0, 3]) == 4
