"""Qwen-Image and Z-Image teachers, tried as a new user would: a tiny teacher saved to a folder,
``from_teacher(folder)``, one call with prompts. The images are one denoiser call on the stock pipeline's own
conditioning (``QwenImagePipeline`` / ``ZImagePipeline`` ``encode_prompt``), converted to the clean sample and
decoded; the project's LoRA loads into the stock pipeline and with ``stock_one_step()`` gives the same images.
(Saving and both load routes, LoRA fuse/unfuse, example conditioning: the registry-driven tests run every family's
tiny teacher.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import QwenImagePipeline, ZImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from test_lora_fd_onestep import trained_lora
from test_pipeline_sdxl_sana import _to_pt
from test_train_sdxl_sana import _run_card_code, train_straight_and_resumed
from tiny_teachers import QWEN_MAX_LENGTH, qwenimage_teacher, zimage_teacher

from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

FAMILIES = ["qwenimage", "zimage"]
PROMPTS = ["a red cat", "dog"]  # different lengths: padded, masked prompts
STOCK = {"qwenimage": QwenImagePipeline, "zimage": ZImagePipeline}
BUILD = {"qwenimage": qwenimage_teacher, "zimage": zimage_teacher}
SETTINGS = {"max_sequence_length": QWEN_MAX_LENGTH, "sample_size": 8}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    for family in FAMILIES:
        torch.manual_seed(0)
        BUILD[family]().save_pretrained(root / family)
    return {family: root / family for family in FAMILIES}


@pytest.fixture(scope="module")
def stocks(folders):
    """The stock pipeline of each tiny teacher, loaded once (tests that load a LoRA into it unload it)."""
    return {family: _stock(folders, family) for family in FAMILIES}


def _stock(folders, family):
    stock = STOCK[family].from_pretrained(folders[family])
    stock.set_progress_bar_config(disable=True)
    return stock


# ------------------------------------------------------------------------------------ one call, by hand
@torch.no_grad()
def qwenimage_by_hand(stock, noise, sigma, guidance_scale):
    """QwenImagePipeline's own conditioning (two encode_prompt calls for true CFG) -> packed transformer calls ->
    norm-rescaled CFG -> x - sigma v -> latents * std + mean -> AutoencoderKLQwenImage decode."""
    n, c, h, w = noise.shape
    packed = QwenImagePipeline._pack_latents(noise, n, c, h, w)

    def velocity(prompts):
        embeds, mask = stock.encode_prompt(prompts, device="cpu", max_sequence_length=QWEN_MAX_LENGTH)
        return stock.transformer(hidden_states=packed, timestep=torch.full((n,), sigma), encoder_hidden_states=embeds,
                                 encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w // 2)]] * n).sample

    v = velocity(PROMPTS)
    if guidance_scale > 1:
        negative = velocity([""] * n)
        combined = negative + guidance_scale * (v - negative)
        v = combined * (v.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
    x0 = QwenImagePipeline._unpack_latents(packed - sigma * v, h * 2, w * 2, 2)
    cfg = stock.vae.config
    x0 = x0 * torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1) + torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    return _to_pt(stock.vae.decode(x0).sample[:, :, 0])


@torch.no_grad()
def zimage_by_hand(stock, noise, sigma, guidance_scale):
    """ZImagePipeline's own conditioning (lists of each prompt's valid tokens) -> one transformer call on lists at
    time 1 - sigma -> pos + (g - 1)(pos - neg), negated -> x - sigma v -> AutoencoderKL decode with shift."""
    guided = guidance_scale > 1
    embeds, negative = stock.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=guided,
                                           max_sequence_length=QWEN_MAX_LENGTH)
    x = torch.cat([noise] * (2 if guided else 1))
    out = stock.transformer(list(x.unsqueeze(2).unbind(0)), torch.full((x.shape[0],), 1 - sigma),
                            embeds + (negative if guided else [])).sample
    out = torch.stack(out)[:, :, 0]
    if guided:
        pos, neg = out.chunk(2)
        out = pos + (guidance_scale - 1) * (pos - neg)
    x0 = noise - sigma * -out
    cfg = stock.vae.config
    return _to_pt(stock.vae.decode(x0 / cfg.scaling_factor + cfg.shift_factor).sample)


BY_HAND = {"qwenimage": qwenimage_by_hand, "zimage": zimage_by_hand}


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_call_is_one_transformer_call_on_the_stock_conditioning(folders, stocks, family, guidance_scale):
    pipe = FDOneStepPipeline.from_teacher(folders[family], guidance_scale=guidance_scale, **SETTINGS)
    assert pipe.family == family and pipe.config.prediction_type == "flow"
    assert pipe.noise_level() == {"kind": "flow", "sigma": 1.0} and pipe.vae_scale_factor == 2
    noise = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(3))
    ours = pipe(PROMPTS, latents=noise, output_type="pt").images
    expected = BY_HAND[family](stocks[family], noise, 1.0, guidance_scale)
    assert ours.shape == expected.shape == (2, 3, 16, 16)
    assert (ours - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_a_timestep_below_the_top_takes_the_schedulers_shift(folders, stocks, family):
    pipe = FDOneStepPipeline.from_teacher(folders[family], timestep=600, **SETTINGS)
    cfg = pipe.scheduler.config
    if family == "qwenimage":  # resolution-dependent exponential shift of 4 x 4 latent tokens
        mu = calculate_shift(16, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        sigma = float(torch.exp(torch.tensor(mu, dtype=torch.float64)) / (
            torch.exp(torch.tensor(mu, dtype=torch.float64)) + (1 / 0.6 - 1)))
    else:  # Z-Image-Turbo's static shift 3
        sigma = 3.0 * 0.6 / (1 + 2.0 * 0.6)
    assert pipe.noise_level()["sigma"] == pytest.approx(sigma, abs=1e-12)
    noise = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(3))
    ours = pipe(PROMPTS, latents=noise, output_type="pt").images
    expected = BY_HAND[family](stocks[family], noise, pipe.noise_level()["sigma"], 1.0)
    assert (ours - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_are_the_stock_encode_prompts_padded_with_a_mask(folders, stocks, family):
    pipe = FDOneStepPipeline.from_teacher(folders[family], guidance_scale=3.0, **SETTINGS)
    stock = stocks[family]
    prompts = list(PROMPTS)
    cond = pipe.encode_conditioning(prompts, negative_prompt=["zzz", ""], num_images_per_prompt=2, device="cpu")
    assert prompts == PROMPTS  # ZImagePipeline.encode_prompt rewrites its list: ours is not handed over
    assert cond.prompt_embeds.shape == (4, QWEN_MAX_LENGTH, 16) and cond.prompt_attention_mask.dtype == torch.long
    for branch, texts in (("", PROMPTS), ("negative_", ["zzz", ""])):
        embeds, mask = getattr(cond, branch + "prompt_embeds"), getattr(cond, branch + "prompt_attention_mask")
        if family == "qwenimage":
            theirs, their_mask = stock.encode_prompt(texts, device="cpu", max_sequence_length=QWEN_MAX_LENGTH)
            theirs = [e[m.bool()] if their_mask is not None else e for e, m in zip(theirs, their_mask)]
        else:
            theirs = stock.encode_prompt(list(texts), device="cpu", do_classifier_free_guidance=False,
                                         max_sequence_length=QWEN_MAX_LENGTH)[0]
        for row in range(4):
            valid = int(mask[row].sum())
            assert mask[row, :valid].all() and not mask[row, valid:].any()  # right padding
            torch.testing.assert_close(embeds[row, :valid], theirs[row // 2], rtol=0, atol=0)
            assert not embeds[row, valid:].any()
    assert cond.prompt_attention_mask[0].sum() != cond.prompt_attention_mask[2].sum()


def test_qwen_image_drops_exactly_the_template_tokens(stocks):
    # QwenImagePipeline drops the first 34 tokens of its template: the tiny tokenizer keeps the template that long,
    # so what stays is the prompt and the template's end, as with the real tokenizer
    stock = stocks["qwenimage"]
    ids = stock.tokenizer(stock.prompt_template_encode.format("a red cat"))["input_ids"]
    kept = stock.tokenizer.convert_ids_to_tokens(ids[stock.prompt_template_encode_start_idx:])
    assert kept[:3] == ["a", "red", "cat"]
    embeds, _ = stock.encode_prompt(["a red cat"], device="cpu")
    assert embeds.shape[1] == len(kept)


# ------------------------------------------------------------------------------------ the LoRA in the stock pipeline
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_projects_lora_loads_into_the_stock_pipeline_and_takes_the_same_one_step(folders, stocks, family,
                                                                                      guidance_scale, tmp_path):
    pipe = FDOneStepPipeline.from_teacher(folders[family], guidance_scale=guidance_scale, output_bound="clamp",
                                          **SETTINGS)
    noise = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(5))
    base = pipe(PROMPTS, latents=noise, output_type="pt").images
    trained_lora(pipe)  # add_lora_to_denoiser + non-zero weights, as a trained LoRA
    pipe.save_lora(tmp_path / "lora")
    ours = pipe(PROMPTS, latents=noise, output_type="pt").images
    assert (base - ours).abs().max() > 1e-3  # the LoRA is what makes them equal below

    stock, scheduler = stocks[family], stocks[family].scheduler
    recipe = pipe.stock_one_step()
    assert recipe["pipeline"] == STOCK[family].__name__
    stock.load_lora_weights(tmp_path / "lora")
    stock.scheduler = recipe["scheduler"]
    try:
        # the stock pipelines take their noise packed (QwenImagePipeline) or as it is (ZImagePipeline)
        latents = QwenImagePipeline._pack_latents(noise, *noise.shape) if family == "qwenimage" else noise
        theirs = stock(PROMPTS, latents=latents, output_type="pt", **recipe["call_kwargs"]).images
    finally:
        stock.unload_lora_weights()
        stock.scheduler = scheduler
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() <= 1e-4


def test_the_qwen_image_recipe_drops_shift_terminal_and_uses_true_cfg(folders):
    pipe = FDOneStepPipeline.from_teacher(folders["qwenimage"], timestep=700, guidance_scale=4.0, **SETTINGS)
    recipe = pipe.stock_one_step()
    # one step with shift_terminal would move the only sigma to shift_terminal (NaN at sigma 1)
    assert recipe["scheduler_overrides"] == {"shift_terminal": None}
    assert recipe["call_kwargs"] == {"num_inference_steps": 1, "height": 16, "width": 16, "sigmas": [0.7],
                                     "max_sequence_length": QWEN_MAX_LENGTH, "true_cfg_scale": 4.0,
                                     "negative_prompt": ""}
    zimage = FDOneStepPipeline.from_teacher(folders["zimage"], guidance_scale=4.0, **SETTINGS).stock_one_step()
    assert zimage["scheduler_overrides"] == {} and zimage["call_kwargs"]["guidance_scale"] == 3.0


# ------------------------------------------------------------------------------------ what is refused
@pytest.mark.parametrize("family,variant", [
    ("qwenimage", "QwenImageEditPipeline"), ("qwenimage", "QwenImageImg2ImgPipeline"),
    ("qwenimage", "QwenImageInpaintPipeline"), ("qwenimage", "QwenImageControlNetPipeline"),
    ("zimage", "ZImageImg2ImgPipeline"), ("zimage", "ZImageInpaintPipeline"), ("zimage", "ZImageControlNetPipeline"),
])
def test_edit_img2img_inpaint_and_controlnet_variants_are_clear_errors_naming_the_base_pipeline(folders, family,
                                                                                                 variant, tmp_path):
    shutil.copytree(folders[family], tmp_path / "variant")
    index = json.loads((tmp_path / "variant" / "model_index.json").read_text())
    (tmp_path / "variant" / "model_index.json").write_text(json.dumps({**index, "_class_name": variant}))
    with pytest.raises(ValueError, match=f"{variant}.*text-to-image.*{STOCK[family].__name__}"):
        FDOneStepPipeline.from_teacher(tmp_path / "variant")


def test_a_qwen_image_edit_transformer_is_a_clear_error(stocks):
    stock = stocks["qwenimage"]
    edit = type(stock.transformer).from_config({**stock.transformer.config, "zero_cond_t": True})
    with pytest.raises(ValueError, match="edit / layered model.*QwenImagePipeline base model"):
        FDOneStepPipeline(transformer=edit, scheduler=stock.scheduler, vae=stock.vae, text_encoder=stock.text_encoder,
                          tokenizer=stock.tokenizer)


# ------------------------------------------------------------------------------------ the training script
def _train(script, assets, family, out, *extra):
    from train_fixtures import FAST_ARGS, encoder_args

    argv = ["--pretrained_model_name_or_path", assets["teachers"][family], *encoder_args(assets),
            "--output_dir", str(out), *FAST_ARGS, "--train_batch_size", "2", "--fd_warmup_samples", "4",
            "--sample_batch_size", "4", "--num_validation_images", "2", "--num_validation_samples", "4",
            "--fd_population", "ema", "--fd_ema_beta", "0.5", "--checkpointing_steps", "1", "--resolution", "16",
            "--prompts_file", assets["prompts_file"], *extra]
    return script.main(script.parse_args(argv))


@pytest.mark.slow
@pytest.mark.parametrize("family,lora", [("qwenimage", True), ("zimage", False)], ids=["qwenimage-lora", "zimage-full"])
def test_an_interrupted_run_resumes_exactly_and_its_card_code_runs(script, assets, tmp_path, family, lora):
    extra = ["--use_lora", "--lora_rank", "2"] if lora else []
    weights = "pytorch_lora_weights.safetensors" if lora else "transformer/diffusion_pytorch_model.safetensors"
    straight, _ = train_straight_and_resumed(lambda out, *args: _train(script, assets, family, out, *args), tmp_path,
                                             extra, weights)

    spaces = _run_card_code(straight)
    if lora:  # ours (the teacher + the LoRA) and the stock pipeline's one step with the LoRA
        assert len(spaces) == 2 and type(spaces[1]["pipe"]).__name__ == STOCK[family].__name__
        info = json.loads((straight / "fd_onestep_lora.json").read_text())
        pipe = FDOneStepPipeline.from_teacher(info["base_model"], **info["one_step_settings"])
        pipe.load_lora_weights(straight)
        noise = torch.randn(1, *pipe.noise_shape(), generator=torch.Generator().manual_seed(2))
        ours = pipe("a red square", latents=noise, output_type="pt").images
        latents = QwenImagePipeline._pack_latents(noise, *noise.shape) if family == "qwenimage" else noise
        theirs = spaces[1]["pipe"]("a red square", latents=latents, output_type="pt",
                                   **pipe.stock_one_step()["call_kwargs"]).images
        assert (ours - theirs).abs().max() <= 1e-4
    else:  # the pipeline folder with fd-onestep, and without it (the pipeline file travels with the folder)
        assert len(spaces) == 2 and type(spaces[1]["pipe"]).__name__ == "FDOneStepPipeline"
        assert FDOneStepPipeline.from_pretrained(straight).family == family


@pytest.mark.slow
@pytest.mark.parametrize("family,lora", [("qwenimage", False), ("zimage", True)], ids=["qwenimage-full", "zimage-lora"])
def test_the_other_way_of_training_each_family(script, assets, tmp_path, family, lora):
    out = tmp_path / "out"
    _train(script, assets, family, out, "--max_train_steps", "1", *(["--use_lora", "--lora_rank", "2"] if lora else []))
    spaces = _run_card_code(out)
    if lora:
        assert json.loads((out / "fd_onestep_lora.json").read_text())["stock_pipeline"]["pipeline"] == "ZImagePipeline"
        assert type(spaces[1]["pipe"]).__name__ == "ZImagePipeline"
    else:
        pipe = FDOneStepPipeline.from_pretrained(out)
        assert pipe.family == family and pipe.config.sample_size == 8
        images = pipe(["two cats"], generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_one_step_runs_on_shape_only_prompts_as_the_plan_runs_it(folders, family):
    # fd-onestep plan runs the step under fake tensors: no token count can be read, every position counts
    from torch._subclasses.fake_tensor import FakeTensorMode

    pipe = FDOneStepPipeline.from_teacher(folders[family], guidance_scale=2.0, **SETTINGS)
    with FakeTensorMode(allow_non_fake_inputs=True):
        cond = pipe.example_conditioning(2)
        x0 = pipe.one_step(torch.randn(2, *pipe.noise_shape()), cond, decode=False)
    assert tuple(x0.shape) == (2, *pipe.noise_shape())
