"""Prompt embeddings of FDOneStepPipeline are the stock diffusers pipelines' ``encode_prompt`` outputs.

For each text family the reference is the tiny *stock* teacher (a real ``StableDiffusionPipeline`` /
``StableDiffusion3Pipeline`` / ``FluxPipeline``, see test_pipeline_tiny_models) calling its own
``encode_prompt`` on the same prompts, negative prompts, guidance and images per prompt; the one-step
pipeline is built over the very same components. Equality is exact (same modules, same inputs).
"""

from __future__ import annotations

import pytest
import torch
from test_pipeline_fd_onestep import onestep_from
from test_pipeline_tiny_models import T5_MAX_LENGTH, TEACHERS

pytestmark = pytest.mark.filterwarnings("ignore:ill-conditioned one-step map")

PROMPTS = ["a cab", "dog"]
# (guidance_scale, negative_prompt, num_images_per_prompt); negatives are lists, as the stock pipelines want them
# with a list of prompts. Without guidance a negative prompt is ignored, by both.
CASES = [
    (1.0, None, 1),
    (4.0, None, 1),  # the default negative prompt ""
    (4.0, ["zzz", "a b c"], 3),
    (1.0, ["zzz", "a b c"], 2),
]
CASE_IDS = ["no-guidance", "guidance-default-negative", "guidance-negatives-x3", "no-guidance-negatives-ignored-x2"]


def teacher(family, **kwargs):
    torch.manual_seed(0)
    return TEACHERS[family](**kwargs)


def ours(pipe, guidance_scale, negative_prompt, n):
    return pipe.encode_conditioning(prompt=PROMPTS, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                                    num_images_per_prompt=n, device="cpu")


def assert_same(actual, expected):
    """Exactly the stock tensor (None where the stock pipeline has none)."""
    if expected is None:
        assert actual is None
        return
    assert actual is not None and actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def captured_denoiser_inputs(pipe, monkeypatch, **call):
    """The (encoder_hidden_states, pooled_projections) the one-step pipeline feeds its denoiser."""
    seen = {}
    original = pipe.denoiser.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.denoiser, "forward", spy)
    noise = torch.zeros(len(PROMPTS) * call.get("num_images_per_prompt", 1), *pipe.noise_shape())
    pipe(prompt=PROMPTS, latents=noise, output_type="latent", **call)
    return seen["encoder_hidden_states"], seen.get("pooled_projections")


# ------------------------------------------------------------------------------------ sd
@pytest.mark.parametrize("use_attention_mask", [False, True])
@pytest.mark.parametrize("guidance_scale,negative_prompt,n", CASES, ids=CASE_IDS)
def test_sd_embeddings_are_stable_diffusion_encode_prompt(guidance_scale, negative_prompt, n, use_attention_mask):
    stock = teacher("sd")
    # some SD text encoders take the tokenizer's attention mask (padding only: CLIP's pad token is its EOS)
    stock.text_encoder.config.use_attention_mask = use_attention_mask
    pipe = onestep_from(stock)
    cond = ours(pipe, guidance_scale, negative_prompt, n)
    embeds, negative = stock.encode_prompt(PROMPTS, "cpu", n, guidance_scale > 1, negative_prompt)
    assert len(cond) == len(PROMPTS) * n
    assert_same(cond.prompt_embeds, embeds)
    assert_same(cond.negative_prompt_embeds, negative)
    assert cond.pooled_prompt_embeds is None and cond.negative_pooled_prompt_embeds is None


# ------------------------------------------------------------------------------------ sd3
@pytest.mark.parametrize("with_t5,max_sequence_length", [(True, T5_MAX_LENGTH), (True, 5), (False, T5_MAX_LENGTH)],
                         ids=["t5", "t5-msl5", "no-t5-zeros"])
@pytest.mark.parametrize("guidance_scale,negative_prompt,n", CASES, ids=CASE_IDS)
def test_sd3_embeddings_are_stable_diffusion_3_encode_prompt(guidance_scale, negative_prompt, n, with_t5,
                                                            max_sequence_length):
    stock = teacher("sd3", with_t5=with_t5)
    pipe = onestep_from(stock, max_sequence_length=max_sequence_length)
    cond = ours(pipe, guidance_scale, negative_prompt, n)
    embeds, negative, pooled, negative_pooled = stock.encode_prompt(
        PROMPTS, None, None, device="cpu", num_images_per_prompt=n, do_classifier_free_guidance=guidance_scale > 1,
        negative_prompt=negative_prompt, max_sequence_length=max_sequence_length,
    )
    # CLIP tokens (padded to the T5 width) then max_sequence_length T5 tokens (zeros without T5)
    assert embeds.shape == (len(PROMPTS) * n, stock.tokenizer.model_max_length + max_sequence_length,
                            stock.transformer.config.joint_attention_dim)
    assert_same(cond.prompt_embeds, embeds)
    assert_same(cond.pooled_prompt_embeds, pooled)
    assert_same(cond.negative_prompt_embeds, negative)
    assert_same(cond.negative_pooled_prompt_embeds, negative_pooled)


@pytest.mark.parametrize("with_t5", [True, False], ids=["fp32-t5", "no-t5"])
def test_sd3_with_bf16_clip_encoders_keeps_the_stock_dtypes(with_t5):
    stock = teacher("sd3", with_t5=with_t5)
    stock.text_encoder.to(torch.bfloat16)
    stock.text_encoder_2.to(torch.bfloat16)
    pipe = onestep_from(stock)
    cond = ours(pipe, 4.0, None, 1)
    embeds, negative, pooled, negative_pooled = stock.encode_prompt(
        PROMPTS, None, None, device="cpu", negative_prompt=None, max_sequence_length=pipe.config.max_sequence_length,
    )
    # the T5 block stays in T5's float32 (the joint sequence is promoted); T5-absent zeros take the CLIP dtype
    assert embeds.dtype == (torch.float32 if with_t5 else torch.bfloat16) and pooled.dtype == torch.bfloat16
    assert_same(cond.prompt_embeds, embeds)
    assert_same(cond.pooled_prompt_embeds, pooled)
    assert_same(cond.negative_prompt_embeds, negative)
    assert_same(cond.negative_pooled_prompt_embeds, negative_pooled)


# ------------------------------------------------------------------------------------ flux
@pytest.mark.parametrize("guidance_scale,negative_prompt,n", CASES, ids=CASE_IDS)
def test_flux_embeddings_are_flux_encode_prompt(guidance_scale, negative_prompt, n):
    stock = teacher("flux")
    pipe = onestep_from(stock)
    cond = ours(pipe, guidance_scale, negative_prompt, n)
    length = pipe.config.max_sequence_length
    embeds, pooled, _ = stock.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=n, max_sequence_length=length)
    assert embeds.shape[:2] == (len(PROMPTS) * n, T5_MAX_LENGTH)
    assert_same(cond.prompt_embeds, embeds)
    assert_same(cond.pooled_prompt_embeds, pooled)
    negative = negative_pooled = None
    if guidance_scale > 1:
        # true CFG: FluxPipeline encodes its negative prompt with the same encode_prompt (our default negative is "")
        negatives = negative_prompt if negative_prompt is not None else [""] * len(PROMPTS)
        negative, negative_pooled, _ = stock.encode_prompt(negatives, device="cpu", num_images_per_prompt=n,
                                                           max_sequence_length=length)
    assert_same(cond.negative_prompt_embeds, negative)
    assert_same(cond.negative_pooled_prompt_embeds, negative_pooled)


def test_guidance_distilled_flux_has_no_negative_branch():
    stock = teacher("flux", guidance_embeds=True)
    pipe = onestep_from(stock)
    cond = ours(pipe, 4.0, ["zzz", "a b c"], 2)
    embeds, pooled, _ = stock.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=2,
                                            max_sequence_length=pipe.config.max_sequence_length)
    assert_same(cond.prompt_embeds, embeds)
    assert_same(cond.pooled_prompt_embeds, pooled)
    assert cond.negative_prompt_embeds is None and cond.negative_pooled_prompt_embeds is None


# ------------------------------------------------------------------------------------ what the denoiser gets
@torch.no_grad()  # as in the pipeline call (CPU kernels can differ in the last bit with autograd on)
def stock_guided_embeddings(stock, family, negatives, n, length):
    """(prompt, negative, pooled, negative pooled) embeddings from the stock pipeline's encode_prompt."""
    if family == "sd":
        return (*stock.encode_prompt(PROMPTS, "cpu", n, True, negatives), None, None)
    if family == "sd3":
        embeds, negative, pooled, negative_pooled = stock.encode_prompt(
            PROMPTS, None, None, device="cpu", num_images_per_prompt=n, negative_prompt=negatives,
            max_sequence_length=length,
        )
        return embeds, negative, pooled, negative_pooled
    embeds, pooled, _ = stock.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=n, max_sequence_length=length)
    negative, negative_pooled, _ = stock.encode_prompt(negatives, device="cpu", num_images_per_prompt=n,
                                                       max_sequence_length=length)
    return embeds, negative, pooled, negative_pooled


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_the_denoiser_is_fed_the_stock_embeddings_cond_then_uncond(family, monkeypatch):
    stock = teacher(family)
    pipe = onestep_from(stock)
    negatives = ["zzz", "a b c"]
    fed, fed_pooled = captured_denoiser_inputs(pipe, monkeypatch, guidance_scale=3.0, negative_prompt=negatives,
                                               num_images_per_prompt=2)
    embeds, negative, pooled, negative_pooled = stock_guided_embeddings(stock, family, negatives, 2,
                                                                        pipe.config.max_sequence_length)
    assert_same(fed, torch.cat([embeds, negative]))
    assert_same(fed_pooled, None if pooled is None else torch.cat([pooled, negative_pooled]))


def test_the_stock_pipeline_is_built_once_shares_the_modules_and_follows_a_replaced_encoder():
    stock = teacher("sd3")
    pipe = onestep_from(stock)
    pipe.encode_conditioning(prompt=PROMPTS, device="cpu")
    built = pipe._stock_text_pipeline()
    assert pipe._stock_text_pipeline() is built
    assert built.text_encoder is pipe.text_encoder and built.text_encoder_3 is pipe.text_encoder_3  # no copies
    # nothing but what encode_prompt reads: the shared scheduler's config is left alone
    assert built.scheduler is None and built.vae is None
    other = teacher("sd3")
    pipe.register_modules(text_encoder=other.text_encoder)
    assert pipe._stock_text_pipeline().text_encoder is other.text_encoder
