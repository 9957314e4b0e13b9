"""The FLUX.2 families, tried as a new user would: FLUX.2 [dev] (``Flux2Pipeline``: Mistral3 text encoder, embedded
guidance) and FLUX.2 [klein] (``Flux2KleinPipeline``: Qwen3 text encoder, true classifier-free guidance).

A tiny teacher saved to a folder becomes a one-step pipeline with ``from_teacher``; one call equals one transformer
call on the stock pipeline's own conditioning (``encode_prompt``, position ids, ``compute_empirical_mu``, batch-norm
latent statistics) computed by hand; a one-step LoRA loads into the stock pipeline and, with ``stock_one_step()``,
gives the same images. (Saving and both loading routes are pinned for every family in test_pipeline_fd_onestep.py.)
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from test_lora_fd_onestep import trained_lora
from test_train_sdxl_sana import _run_card_code, train_straight_and_resumed
from tiny_teachers import FAMILY_KWARGS, TEACHERS, flux2_klein_teacher

from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

FAMILIES = {"flux2": Flux2Pipeline, "flux2_klein": Flux2KleinPipeline}
PROMPTS = ["a red cat", "two blue dogs"]
_SIGNATURE = set(inspect.signature(FDOneStepPipeline.__init__).parameters)


def onestep(teacher, **settings):
    return FDOneStepPipeline(**{k: v for k, v in teacher.components.items() if k in _SIGNATURE}, **settings)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each FLUX.2 tiny teacher saved as its stock pipeline saves itself."""
    root = tmp_path_factory.mktemp("flux2_teachers")
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        TEACHERS[family]().save_pretrained(root / family)
        out[family] = root / family
    return out


def _stock(folders, family):
    stock = FAMILIES[family].from_pretrained(folders[family])
    stock.set_progress_bar_config(disable=True)
    return stock


@torch.no_grad()
def one_step_by_hand(stock, noise, prompts, timestep, guidance_scale, max_sequence_length):
    """The stock pipeline's one Euler step from ``noise`` (its ``latents``), piece by piece, decoded to [0, 1]."""
    n = noise.shape[0]
    embeds, text_ids = stock.encode_prompt(prompts, device="cpu", max_sequence_length=max_sequence_length)
    size = noise.shape[-1] * 2 * stock.vae_scale_factor
    packed, latent_ids = stock.prepare_latents(n, noise.shape[1] // 4, size, size, embeds.dtype, "cpu", None,
                                               latents=noise)
    stock.scheduler.set_timesteps(sigmas=[timestep / 1000], mu=compute_empirical_mu(packed.shape[1], 1))
    t, sigma = stock.scheduler.timesteps[0], stock.scheduler.sigmas[0]
    embedded = stock.transformer.config.guidance_embeds

    def velocity(embeds, text_ids):
        guidance = torch.full((n,), guidance_scale) if embedded else None
        return stock.transformer(hidden_states=packed, timestep=t.expand(n) / 1000, guidance=guidance,
                                 encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=latent_ids,
                                 return_dict=False)[0]

    v = velocity(embeds, text_ids)
    if not embedded and guidance_scale > 1:  # Flux2KleinPipeline: true CFG against the empty prompt
        negative, negative_ids = stock.encode_prompt([""] * n, device="cpu", max_sequence_length=max_sequence_length)
        v_negative = velocity(negative, negative_ids)
        v = v_negative + guidance_scale * (v - v_negative)
    x0 = packed - sigma * v
    latents = stock._unpack_latents_with_ids(x0, latent_ids)
    bn = stock.vae.bn
    latents = latents * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + stock.vae.config.batch_norm_eps)
    latents = stock._unpatchify_latents(latents + bn.running_mean.view(1, -1, 1, 1))
    return stock.image_processor.postprocess(stock.vae.decode(latents, return_dict=False)[0], output_type="pt")


@pytest.mark.parametrize("settings", [{}, {"timestep": 600, "guidance_scale": 3.5}], ids=["top", "t600-guided"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_teacher_one_call_is_one_transformer_call_on_the_stock_conditioning(folders, family, settings):
    kwargs = FAMILY_KWARGS[family]
    pipe = FDOneStepPipeline.from_teacher(folders[family], **kwargs, **settings)
    assert pipe.family == family and pipe.adapter.stock_pipeline == FAMILIES[family].__name__
    noise = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(3))
    ours = pipe(prompt=PROMPTS, latents=noise, output_type="pt").images
    expected = one_step_by_hand(_stock(folders, family), noise, PROMPTS, settings.get("timestep", 1000),
                                settings.get("guidance_scale", 1.0), kwargs["max_sequence_length"])
    assert ours.shape == expected.shape == (2, 3, 16, 16)
    assert (ours - expected).abs().max() <= 1e-4
    # the prompt reaches the image (the template does not crowd it out of max_sequence_length: the same
    # embeddings would give bit-equal images)
    other = pipe(prompt=["the sea", "a big house"], latents=noise, output_type="pt").images
    assert (other - ours).abs().max() > 1e-5


def test_the_one_step_noise_level_follows_flux2s_own_resolution_dependent_shift(folders):
    pipe = FDOneStepPipeline.from_teacher(folders["flux2"], **{**FAMILY_KWARGS["flux2"], "sample_size": 8},
                                          timestep=600)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(sigmas=[0.6], mu=compute_empirical_mu(image_seq_len=64, num_steps=1))
    assert pipe.noise_level()["sigma"] == pytest.approx(float(scheduler.sigmas[0]), abs=1e-6)
    # not the FLUX.1 interpolation between the scheduler's base and max shift
    m = (1.15 - 0.5) / (4096 - 256)
    assert pipe.noise_level()["sigma"] != pytest.approx(float(scheduler.time_shift(64 * m + 0.5 - 256 * m, 1.0,
                                                                                   torch.tensor(0.6))), abs=1e-3)


@pytest.mark.parametrize("settings", [{}, {"timestep": 700, "guidance_scale": 3.0}], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_saved_lora_in_the_stock_pipeline_takes_the_same_one_step(folders, family, settings, tmp_path):
    torch.manual_seed(0)
    pipe = FDOneStepPipeline.from_teacher(folders[family], **FAMILY_KWARGS[family], **settings)
    trained_lora(pipe)
    pipe.save_lora(tmp_path / "lora")
    stock = _stock(folders, family)
    stock.load_lora_weights(tmp_path / "lora")  # Flux2LoraLoaderMixin, the stock pipeline's own loader
    recipe = pipe.stock_one_step()
    assert recipe["pipeline"] == FAMILIES[family].__name__
    assert recipe["call_kwargs"]["guidance_scale"] == settings.get("guidance_scale", 1.0)
    stock.scheduler = recipe["scheduler"]
    ours = pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(5), output_type="pt").images
    theirs = stock(prompt=PROMPTS, generator=torch.Generator().manual_seed(5), output_type="pt",
                   **recipe["call_kwargs"]).images
    assert (ours - theirs).abs().max() <= 1e-4
    without = FDOneStepPipeline.from_teacher(folders[family], **FAMILY_KWARGS[family], **settings)
    base = without(prompt=PROMPTS, generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert (base - ours).abs().max() > 1e-3  # the LoRA changes the images


# ------------------------------------------------------------------------------------------- refused, clearly
@pytest.mark.parametrize("variant,base", [("Flux2KleinInpaintPipeline", "Flux2KleinPipeline"),
                                          ("Flux2KleinKVPipeline", "Flux2KleinPipeline")])
def test_editing_and_inpainting_variants_are_refused_naming_the_base_pipeline(folders, tmp_path, variant, base):
    import shutil

    folder = tmp_path / "variant"
    shutil.copytree(folders["flux2_klein"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": variant}))
    with pytest.raises(ValueError, match=f"is a {variant}.*{base}"):
        FDOneStepPipeline.from_teacher(folder)


def test_a_text_encoder_without_the_stacked_layers_is_refused_naming_them():
    torch.manual_seed(0)
    teacher = flux2_klein_teacher()
    teacher.text_encoder.config.num_hidden_layers = 12  # as a smaller Qwen3 would have
    with pytest.raises(ValueError, match=r"stacks the text encoder's hidden states \(9, 18, 27\).* 12 layers"):
        onestep(teacher)
    teacher.text_encoder.config.num_hidden_layers = 28
    teacher.text_encoder.config.hidden_size = 32  # another Qwen3 than the transformer was trained on
    with pytest.raises(ValueError, match=r"3 stacked hidden states x 32 = 96 .* joint_attention_dim=48"):
        onestep(teacher)


def test_the_two_families_are_told_apart_by_the_transformers_guidance_embedding():
    torch.manual_seed(0)
    dev, klein = TEACHERS["flux2"](), TEACHERS["flux2_klein"]()
    assert dev.transformer.config.guidance_embeds and not klein.transformer.config.guidance_embeds
    for family, teacher in (("flux2", dev), ("flux2_klein", klein)):
        assert onestep(teacher, **FAMILY_KWARGS[family]).family == family
    # embedded guidance is one forward; klein's true CFG batches the empty prompt's branch
    assert not onestep(dev, **FAMILY_KWARGS["flux2"]).adapter.uses_negative_branch(4.0)
    assert onestep(klein, **FAMILY_KWARGS["flux2_klein"]).adapter.uses_negative_branch(4.0)


def test_long_prompts_are_counted_with_the_processors_text_tokenizer():
    """FLUX.2-dev's ``tokenizer`` is a PixtralProcessor (its first argument is images): the training script's
    long-prompt warning counts the prompts with the processor's text tokenizer against ``max_sequence_length``."""
    from fd_onestep.training.checks import prompt_token_limits, warn_long_prompts

    torch.manual_seed(0)
    limits = prompt_token_limits(onestep(TEACHERS["flux2"](), **FAMILY_KWARGS["flux2"]))
    assert [limit for *_, limit in limits] == [FAMILY_KWARGS["flux2"]["max_sequence_length"]]
    assert warn_long_prompts(["a red cat", " ".join(["dog"] * 50)], limits) == 1


@pytest.mark.parametrize("family", [*FAMILIES, "zimage"])
def test_long_prompts_are_counted_inside_the_stock_pipelines_prompt_template(family):
    """The stock pipeline truncates the templated prompt (FLUX.2's system message, Qwen3's chat template in FLUX.2
    [klein] and Z-Image) to
    max_sequence_length: a prompt whose own tokens fit but whose templated tokens do not is warned about."""
    from fd_onestep.prompt_store import text_tokenizer
    from fd_onestep.training.checks import prompt_token_limits, warn_long_prompts

    torch.manual_seed(0)
    pipe = onestep(TEACHERS[family](), **FAMILY_KWARGS[family])
    ((what, count, limit),) = prompt_token_limits(pipe)
    assert "prompt template" in what
    alone = text_tokenizer(pipe.tokenizer)
    words = next(n for n in range(1, limit + 1) if count([" ".join(["dog"] * n)])[0] > limit)
    prompt = " ".join(["dog"] * words)
    assert len(alone(prompt)["input_ids"]) <= limit  # the prompt alone fits
    assert warn_long_prompts(["a red cat", prompt], prompt_token_limits(pipe)) == 1
    # and it is what the stock pipeline cuts: the templated prompt fills max_sequence_length
    assert count(["a red cat"])[0] < limit


# ------------------------------------------------------------------------------------------- the training script
def _train(script, assets, teacher, out, *extra):
    from train_fixtures import FAST_ARGS, encoder_args

    argv = ["--pretrained_model_name_or_path", str(teacher), *encoder_args(assets), "--output_dir", str(out),
            *FAST_ARGS, "--train_batch_size", "2", "--fd_warmup_samples", "4", "--sample_batch_size", "4",
            "--num_validation_images", "2", "--num_validation_samples", "4", "--fd_population", "ema",
            "--fd_ema_beta", "0.5", "--checkpointing_steps", "1", "--resolution", "16",
            "--prompts_file", assets["prompts_file"], "--max_sequence_length",
            str(FAMILY_KWARGS[teacher.name]["max_sequence_length"]), *extra]
    return script.main(script.parse_args(argv))


@pytest.mark.slow
@pytest.mark.parametrize("family,lora", [("flux2", True), ("flux2_klein", False)], ids=["flux2-lora", "klein-full"])
def test_the_training_script_trains_resumes_exactly_and_writes_a_card_whose_code_runs(script, assets, folders,
                                                                                     tmp_path, family, lora):
    extra = ["--use_lora", "--lora_rank", "2"] if lora else []
    weights = "pytorch_lora_weights.safetensors" if lora else "transformer/diffusion_pytorch_model.safetensors"
    straight, _ = train_straight_and_resumed(lambda out, *args: _train(script, assets, folders[family], out, *args),
                                             tmp_path, extra, weights)
    spaces = _run_card_code(straight)
    if lora:  # ours, and the stock pipeline with the LoRA and stock_one_step()'s settings
        assert type(spaces[1]["pipe"]).__name__ == FAMILIES[family].__name__
        info = json.loads((straight / "fd_onestep_lora.json").read_text())
        pipe = FDOneStepPipeline.from_teacher(info["base_model"], **info["one_step_settings"])
        pipe.load_lora_weights(straight)
        recipe, stock = pipe.stock_one_step(), spaces[1]["pipe"]
        ours = pipe(prompt="a red cat", generator=torch.Generator().manual_seed(2), output_type="pt").images
        theirs = stock(prompt="a red cat", generator=torch.Generator().manual_seed(2), output_type="pt",
                       **recipe["call_kwargs"]).images
        assert (ours - theirs).abs().max() <= 1e-4
    else:
        assert FDOneStepPipeline.from_pretrained(straight).family == family
        assert all(np.asarray(space["images"]).shape == (16, 16, 3) for space in spaces)


@pytest.mark.slow
@pytest.mark.parametrize("family,lora", [("flux2", False), ("flux2_klein", True)], ids=["flux2-full", "klein-lora"])
def test_the_other_way_of_training_each_family(script, assets, folders, tmp_path, family, lora):
    out = tmp_path / "out"
    _train(script, assets, folders[family], out, *(["--use_lora", "--lora_rank", "2"] if lora else []))
    spaces = _run_card_code(out)
    if lora:
        assert type(spaces[1]["pipe"]).__name__ == FAMILIES[family].__name__
    else:
        pipe = FDOneStepPipeline.from_pretrained(out)
        assert pipe.family == family and pipe.config.sample_size == 4
        images = pipe(prompt=["two cats"], generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_a_step_distilled_klein_takes_no_guidance_as_its_stock_pipeline(tmp_path):
    """``is_distilled: true`` in a FLUX.2 [klein] teacher's model_index (the step-distilled releases):
    ``Flux2KleinPipeline`` ignores ``guidance_scale`` there, and so does the one step, by the stock pipeline's own
    reading of the setting (a guided call equals the unguided one and the stock one-step call)."""
    torch.manual_seed(0)
    teacher = flux2_klein_teacher()
    teacher.register_to_config(is_distilled=True)
    teacher.save_pretrained(tmp_path / "klein")
    kwargs = FAMILY_KWARGS["flux2_klein"]
    pipe = FDOneStepPipeline.from_teacher(tmp_path / "klein", **kwargs, guidance_scale=4.0)
    assert pipe.config.is_distilled is True
    noise = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(3))
    guided = pipe(prompt=PROMPTS, latents=noise, output_type="pt").images
    plain = pipe(prompt=PROMPTS, latents=noise, guidance_scale=1.0, output_type="pt").images
    assert torch.equal(guided, plain)
    stock = Flux2KleinPipeline.from_pretrained(tmp_path / "klein")
    stock.set_progress_bar_config(disable=True)
    expected = one_step_by_hand(stock, noise, PROMPTS, 1000, 1.0, kwargs["max_sequence_length"])
    assert (guided - expected).abs().max() <= 1e-4
    # the same teacher without the setting does guide
    assert not FDOneStepPipeline.from_teacher(tmp_path / "klein", **kwargs, is_distilled=False,
                                              guidance_scale=4.0)(prompt=PROMPTS, latents=noise,
                                                                  output_type="pt").images.equal(guided)
