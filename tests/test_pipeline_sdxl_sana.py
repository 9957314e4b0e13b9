"""SDXL and SANA teachers, tried as a new user would: a tiny teacher saved to a folder, ``from_teacher(folder)``, one
call with prompts. The images are one denoiser call on the stock pipeline's own conditioning, converted to the clean
sample and decoded; the project's LoRA loads into the stock ``StableDiffusionXLPipeline`` / ``SanaPipeline`` and
with ``stock_one_step()`` gives the same images. (Saving and both load routes: the shared from_teacher test in
test_pipeline_fd_onestep.py runs every family's tiny teacher.)"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from diffusers import SanaPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from test_lora_fd_onestep import trained_lora
from tiny_teachers import SANA_MAX_LENGTH, sana_teacher, sdxl_teacher

from fd_onestep.onestep import OneStepGenerator
from fd_onestep.pipelines.pipeline_fd_onestep import FamilyAdapter, FDOneStepPipeline

pytestmark = pytest.mark.filterwarnings("ignore:ill-conditioned one-step map")
PROMPTS = ["a cab", "dog"]
STOCK = {"sdxl": StableDiffusionXLPipeline, "sana": SanaPipeline}
# what SanaPipeline.__call__ encodes prompts with by default (its encode_prompt alone has none)
SANA_INSTRUCTION = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
# SANA at this size: 8 Gemma tokens (the stock default is 300)
SETTINGS = {"sdxl": {}, "sana": {"max_sequence_length": SANA_MAX_LENGTH}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for family, build in (("sdxl", sdxl_teacher), ("sana", sana_teacher)):
        torch.manual_seed(0)
        build().save_pretrained(root / family)
        out[family] = root / family
    return out


def _stock(folders, family):
    stock = STOCK[family].from_pretrained(folders[family])
    stock.set_progress_bar_config(disable=True)
    return stock


def _to_pt(images):
    return (images / 2 + 0.5).clamp(0, 1)


# ------------------------------------------------------------------------------------ one call, by hand
@torch.no_grad()
def sdxl_by_hand(stock, noise, timestep, guidance_scale):
    """StableDiffusionXLPipeline's own conditioning -> one UNet call -> x0 (epsilon) -> VAE decode."""
    guided = guidance_scale > 1
    embeds, negative, pooled, negative_pooled = stock.encode_prompt(PROMPTS, device="cpu",
                                                                    do_classifier_free_guidance=guided)
    size = noise.shape[-1] * stock.vae_scale_factor
    time_ids = stock._get_add_time_ids((size, size), (0, 0), (size, size), dtype=embeds.dtype,
                                       text_encoder_projection_dim=stock.text_encoder_2.config.projection_dim)
    if guided:  # the stock order: unconditional first
        embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
    x = torch.cat([noise] * (2 if guided else 1))
    out = stock.unet(x, torch.tensor(timestep), encoder_hidden_states=embeds,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(x.shape[0], 1)}).sample
    if guided:
        uncond, cond = out.chunk(2)
        out = uncond + guidance_scale * (cond - uncond)
    a = float(stock.scheduler.alphas_cumprod[timestep])
    x0 = (noise.double() - math.sqrt(1 - a) * out.double()) / math.sqrt(a)
    return _to_pt(stock.vae.decode(x0.float() / stock.vae.config.scaling_factor).sample)


@torch.no_grad()
def sana_by_hand(stock, noise, sigma, guidance_scale, max_sequence_length):
    """SanaPipeline's own conditioning (its complex human instruction) -> one transformer call -> x - sigma v ->
    AutoencoderDC decode."""
    guided = guidance_scale > 1
    embeds, mask, negative, negative_mask = stock.encode_prompt(PROMPTS, guided, device="cpu",
                                                                max_sequence_length=max_sequence_length,
                                                                complex_human_instruction=SANA_INSTRUCTION)
    if guided:
        embeds, mask = torch.cat([negative, embeds]), torch.cat([negative_mask, mask])
    x = torch.cat([noise] * (2 if guided else 1))
    t = torch.full((x.shape[0],), sigma * 1000) * stock.transformer.config.timestep_scale
    v = stock.transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t).sample
    if guided:
        uncond, cond = v.chunk(2)
        v = uncond + guidance_scale * (cond - uncond)
    x0 = noise - sigma * v
    return _to_pt(stock.vae.decode(x0 / stock.vae.config.scaling_factor).sample)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["no-guidance", "guidance"])
def test_sdxl_one_call_is_one_unet_call_on_the_stock_conditioning(folders, guidance_scale):
    pipe = FDOneStepPipeline.from_teacher(folders["sdxl"], guidance_scale=guidance_scale, timestep=500)
    assert pipe.family == "sdxl" and pipe.config.force_zeros_for_empty_prompt is True
    noise = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(3))
    ours = pipe(PROMPTS, latents=noise, output_type="pt").images
    expected = sdxl_by_hand(_stock(folders, "sdxl"), noise, 500, guidance_scale)
    assert ours.shape == expected.shape == (2, 3, 16, 16)
    assert (ours - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5], ids=["no-guidance", "guidance"])
def test_sana_one_call_is_one_transformer_call_on_the_stock_conditioning(folders, guidance_scale):
    pipe = FDOneStepPipeline.from_teacher(folders["sana"], guidance_scale=guidance_scale, **SETTINGS["sana"])
    assert pipe.family == "sana" and pipe.config.prediction_type == "flow"
    assert pipe.noise_level() == {"kind": "flow", "sigma": 1.0} and pipe.vae_scale_factor == 4
    noise = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(3))
    ours = pipe(PROMPTS, latents=noise, output_type="pt").images
    expected = sana_by_hand(_stock(folders, "sana"), noise, 1.0, guidance_scale, SANA_MAX_LENGTH)
    assert ours.shape == expected.shape == (2, 3, 32, 32)
    assert (ours - expected).abs().max() <= 1e-4


def test_sana_timestep_below_the_top_uses_the_teachers_flow_shift(folders):
    pipe = FDOneStepPipeline.from_teacher(folders["sana"], timestep=500, **SETTINGS["sana"])
    shift = pipe.scheduler.config.flow_shift
    assert pipe.noise_level()["sigma"] == pytest.approx(shift * 0.5 / (1 + (shift - 1) * 0.5), abs=1e-12)
    noise = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(3))
    ours = pipe(PROMPTS, latents=noise, output_type="pt").images
    expected = sana_by_hand(_stock(folders, "sana"), noise, pipe.noise_level()["sigma"], 1.0, SANA_MAX_LENGTH)
    assert (ours - expected).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------ the LoRA in the stock pipeline
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_the_projects_lora_loads_into_the_stock_pipeline_and_takes_the_same_one_step(folders, family, guidance_scale,
                                                                                      tmp_path):
    settings = {"timestep": 500} if family == "sdxl" else {}  # epsilon SDXL: a well-conditioned level
    pipe = FDOneStepPipeline.from_teacher(folders[family], guidance_scale=guidance_scale, output_bound="clamp",
                                          **settings, **SETTINGS[family])
    trained_lora(pipe)  # add_lora_to_denoiser + non-zero weights, as a trained LoRA
    pipe.save_lora(tmp_path / "lora")
    ours = pipe(PROMPTS, generator=torch.Generator().manual_seed(5), output_type="pt").images

    stock = _stock(folders, family)
    stock.load_lora_weights(tmp_path / "lora")
    recipe = pipe.stock_one_step()
    assert recipe["pipeline"] == STOCK[family].__name__
    stock.scheduler = recipe["scheduler"]
    theirs = stock(PROMPTS, generator=torch.Generator().manual_seed(5), output_type="pt",
                   **recipe["call_kwargs"]).images
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() <= 1e-4
    untrained = FDOneStepPipeline.from_teacher(folders[family], guidance_scale=guidance_scale, output_bound="clamp",
                                               **settings, **SETTINGS[family])
    base = untrained(PROMPTS, generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert (base - ours).abs().max() > 1e-3  # the LoRA is what makes them equal


def test_the_sana_recipe_is_flow_match_euler_with_the_teachers_shift(folders):
    pipe = FDOneStepPipeline.from_teacher(folders["sana"], timestep=700, **SETTINGS["sana"])
    recipe = pipe.stock_one_step()
    assert type(recipe["scheduler"]).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert recipe["scheduler_overrides"] == {"shift": 3.0}
    assert recipe["call_kwargs"] == {"num_inference_steps": 1, "height": 32, "width": 32, "sigmas": [0.7],
                                     "max_sequence_length": SANA_MAX_LENGTH, "guidance_scale": 1.0,
                                     "use_resolution_binning": False}


# ------------------------------------------------------------------------------------ SDXL specifics
@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_negative_branch_follows_force_zeros_for_empty_prompt(force_zeros, tmp_path):
    torch.manual_seed(0)
    sdxl_teacher(force_zeros_for_empty_prompt=force_zeros).save_pretrained(tmp_path / "sdxl")
    pipe = FDOneStepPipeline.from_teacher(tmp_path / "sdxl", guidance_scale=3.0)
    assert pipe.config.force_zeros_for_empty_prompt is force_zeros
    stock = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl")
    cond = pipe.encode_conditioning(PROMPTS, device="cpu", num_images_per_prompt=2)
    embeds, negative, pooled, negative_pooled = stock.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=2)
    for ours, theirs in ((cond.prompt_embeds, embeds), (cond.pooled_prompt_embeds, pooled),
                         (cond.negative_prompt_embeds, negative),
                         (cond.negative_pooled_prompt_embeds, negative_pooled)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert bool((cond.negative_prompt_embeds == 0).all()) is force_zeros
    # an explicit negative prompt is encoded either way, as the stock pipeline does
    cond = pipe.encode_conditioning(PROMPTS, negative_prompt=["zz", "b"], device="cpu")
    negative = stock.encode_prompt(PROMPTS, device="cpu", negative_prompt=["zz", "b"])[1]
    torch.testing.assert_close(cond.negative_prompt_embeds, negative, rtol=0, atol=0)


def test_sdxl_fp16_vae_with_force_upcast_decodes_in_float32(folders):
    pipe = FDOneStepPipeline.from_teacher(folders["sdxl"], timestep=500)
    assert pipe.vae.config.force_upcast and pipe.float32_component_names == ["vae"]
    latents = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(pipe.vae).half().float()  # the same fp16 weights, decoded in float32
    pipe.vae.half()
    images = pipe.decode_latents(latents)
    assert pipe.vae.dtype == torch.float32 and images.dtype == torch.float32 and torch.isfinite(images).all()
    expected = reference.decode(latents / reference.config.scaling_factor).sample
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    # under an fp16 autocast (the training script's mixed precision) it decodes in float32 all the same
    with torch.autocast("cpu", dtype=torch.float16):
        torch.testing.assert_close(pipe.decode_latents(latents), expected, rtol=0, atol=0)
        assert not torch.equal(FamilyAdapter.decode(pipe.adapter, latents), expected)  # a plain decode runs in fp16
    # training under fp16 mixed precision keeps that VAE in float32, the text encoders in fp16
    pipe.vae.half()
    gen = OneStepGenerator(pipe, prompts=PROMPTS, weight_dtype=torch.float16)
    assert pipe.vae.dtype == torch.float32 and pipe.text_encoder_2.dtype == torch.float16
    assert gen.prompt_embeddings.prompt_embeds.dtype == torch.float16


def test_sdxl_refiner_and_image_to_image_pipelines_are_clear_errors(folders, tmp_path):
    base = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])
    StableDiffusionXLImg2ImgPipeline(**{k: v for k, v in base.components.items()}).save_pretrained(tmp_path / "i2i")
    with pytest.raises(ValueError, match=r"StableDiffusionXLImg2ImgPipeline.*SDXL base text-to-image"):
        FDOneStepPipeline.from_teacher(tmp_path / "i2i")
    # the refiner: no first text encoder, aesthetic-score time ids (5 x 8 + 16 inputs to the added embedding)
    refiner_unet = type(base.unet).from_config({**base.unet.config, "projection_class_embeddings_input_dim": 56})
    with pytest.raises(ValueError, match="refiner"):
        FDOneStepPipeline(unet=refiner_unet, scheduler=base.scheduler, vae=base.vae, text_encoder_2=base.text_encoder_2,
                          tokenizer_2=base.tokenizer_2)
    with pytest.raises(ValueError, match=r"not an SDXL base text-to-image UNet.*refiner"):
        FDOneStepPipeline(unet=refiner_unet, scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
                          tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2)
    other = type(base.unet).from_config(base.unet.config)
    other.register_to_config(addition_embed_type="image")
    with pytest.raises(ValueError, match=r"addition_embed_type='image' is not supported.*sdxl: 'text_time'"):
        FDOneStepPipeline(unet=other, scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
                          tokenizer=base.tokenizer)


# ------------------------------------------------------------------------------------ SANA specifics
def test_sana_prompts_are_encoded_with_the_stock_complex_human_instruction(folders):
    pipe = FDOneStepPipeline.from_teacher(folders["sana"], guidance_scale=3.0, **SETTINGS["sana"])
    default = SANA_INSTRUCTION
    assert pipe.config.complex_human_instruction == list(default)
    stock = _stock(folders, "sana")
    cond = pipe.encode_conditioning(PROMPTS, negative_prompt=["zzz", ""], device="cpu")
    embeds, mask, negative, negative_mask = stock.encode_prompt(
        PROMPTS, True, negative_prompt=["zzz", ""], device="cpu", max_sequence_length=SANA_MAX_LENGTH,
        complex_human_instruction=default,
    )
    for ours, theirs in ((cond.prompt_embeds, embeds), (cond.prompt_attention_mask, mask),
                         (cond.negative_prompt_embeds, negative), (cond.negative_prompt_attention_mask, negative_mask)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    plain = stock.encode_prompt(PROMPTS, False, device="cpu", max_sequence_length=SANA_MAX_LENGTH,
                                complex_human_instruction=None)[0]
    assert not torch.allclose(plain, embeds)  # the instruction changes the embeddings
    # switched off: the stock pipeline is told so
    off = FDOneStepPipeline.from_teacher(folders["sana"], complex_human_instruction=[], **SETTINGS["sana"])
    torch.testing.assert_close(off.encode_conditioning(PROMPTS, device="cpu").prompt_embeds, plain, rtol=0, atol=0)
    assert off.stock_one_step()["call_kwargs"]["complex_human_instruction"] == []


def test_sana_attention_masks_stay_with_their_prompts_for_several_images_per_prompt(folders):
    pipe = FDOneStepPipeline.from_teacher(folders["sana"], complex_human_instruction=[], **SETTINGS["sana"])
    prompts = ["a", "a red cab two cats"]  # different lengths: different masks
    cond = pipe.encode_conditioning(prompts, num_images_per_prompt=3, device="cpu")
    single = [pipe.encode_conditioning([p], device="cpu") for p in prompts]
    for row in range(6):
        one = single[row // 3]
        torch.testing.assert_close(cond.prompt_attention_mask[row], one.prompt_attention_mask[0], rtol=0, atol=0)
        torch.testing.assert_close(cond.prompt_embeds[row], one.prompt_embeds[0], rtol=0, atol=0)
    assert not torch.equal(single[0].prompt_attention_mask, single[1].prompt_attention_mask)
    # the masks reach the transformer, one per sample
    images = pipe(prompts, num_images_per_prompt=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    separately = pipe(prompts[1], generator=torch.Generator().manual_seed(9), output_type="pt",
                      latents=torch.randn(1, *pipe.noise_shape(), generator=torch.Generator().manual_seed(9))).images
    assert images.shape == (6, 3, 32, 32) and separately.shape == (1, 3, 32, 32)


def test_a_sana_sprint_pipeline_is_a_clear_error(folders, tmp_path):
    import json
    import shutil

    shutil.copytree(folders["sana"], tmp_path / "sprint")
    index = json.loads((tmp_path / "sprint" / "model_index.json").read_text())
    (tmp_path / "sprint" / "model_index.json").write_text(json.dumps({**index, "_class_name": "SanaSprintPipeline"}))
    with pytest.raises(ValueError, match="SanaSprintPipeline; one-step FD distillation supports SANA text-to-image"):
        FDOneStepPipeline.from_teacher(tmp_path / "sprint")
