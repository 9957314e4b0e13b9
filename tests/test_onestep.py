"""OneStepGenerator: the training-side adapter around FDOneStepPipeline."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from test_pipeline_tiny_models import FAMILY_KWARGS, TEACHERS

from fd_onestep.onestep import OneStepConditioning, OneStepGenerator, add_lora_to_denoiser
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
