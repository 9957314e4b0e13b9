"""FDOneStepPipeline: parameterization math (oracle), families, conditioning, outputs, save/load routes."""

from __future__ import annotations

import inspect
import json
import math
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, ImagePipelineOutput
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from test_pipeline_tiny_models import FAMILY_KWARGS, TEACHERS

from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline, OneStepConditioning, family_of_denoiser

# the tiny SD / DiT teachers are epsilon models (like the real ones): their warning is pinned in its own test
pytestmark = pytest.mark.filterwarnings("ignore:ill-conditioned one-step map")

_SIGNATURE = set(inspect.signature(FDOneStepPipeline.__init__).parameters)


def onestep_from(teacher, **settings) -> FDOneStepPipeline:
    """The one-step pipeline over a teacher's components (what from_teacher does, without the disk trip)."""
    components = {k: v for k, v in teacher.components.items() if k in _SIGNATURE}
    family = family_of_denoiser(components.get("unet") or components.get("transformer"))
    return FDOneStepPipeline(**components, **{**FAMILY_KWARGS.get(family, {}), **settings})


@pytest.fixture(scope="module")
def teachers():
    cache = {}

    def get(name, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = TEACHERS[name](**kwargs)
        return cache[key]

    return get


def conditioning_kwargs(family, batch=2):
    if family == "dit":
        return {"class_labels": list(range(batch))}
    if FDOneStepPipeline.FAMILY_ADAPTERS[family].conditioning == "text":
        return {"prompt": ["a cab", "dog"][:batch] if batch <= 2 else ["cab"] * batch}
    return {"batch_size": batch}


# ------------------------------------------------------------------------------------ oracle
class OracleForward:
    """Stand-in ``forward`` returning the exact model target for a known clean sample ``x0``.

    The targets come from the forward process as diffusers defines it: x_t = sqrt(a) x0 + sqrt(1-a) eps
    (checked against ``scheduler.add_noise``), v = ``scheduler.get_velocity``; flow: x_t = (1-s) x0 + s n,
    velocity n - x0, with s read from the scheduler's own sigma table.
    """

    def __init__(self, pipe, x0, prediction_type, expected_model_timestep, learned_sigma=False):
        self.pipe, self.x0, self.kind = pipe, x0.double(), prediction_type
        self.expected_t = expected_model_timestep
        self.learned_sigma = learned_sigma
        self.calls, self.batch_sizes = 0, []

    def target(self, x_t):
        x0 = self.x0.expand_as(x_t) if self.x0.shape[0] == 1 else self.x0.repeat(x_t.shape[0] // self.x0.shape[0], 1, 1, 1)
        sched = self.pipe.scheduler
        if self.kind == "flow":
            s = self.sigma
            noise = (x_t - (1 - s) * x0) / s
            return noise - x0
        t = self.pipe.config.timestep
        a = sched.alphas_cumprod[t].double()
        if self.kind == "sample":
            return x0
        if a > 0:
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        else:  # zero terminal SNR: x_t is pure noise
            eps = x_t
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long)
        torch.testing.assert_close(sched.add_noise(x0, eps, tt), x_t, rtol=0, atol=1e-9)
        if self.kind == "epsilon":
            return eps
        return sched.get_velocity(x0, eps, tt)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        family = self.pipe.family
        x_t = args[0] if args else kwargs["hidden_states"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        torch.testing.assert_close(t.double(), torch.full_like(t.double(), self.expected_t), rtol=0, atol=1e-4)
        self.batch_sizes.append(x_t.shape[0])
        if family == "flux":
            vsf = self.pipe.vae_scale_factor
            side = self.pipe.config.sample_size
            x_t = FluxPipeline._unpack_latents(x_t, side * vsf, side * vsf, vsf)
        out = self.target(x_t.double())
        if self.learned_sigma:
            out = torch.cat([out, torch.randn_like(out) * 100], dim=1)
        if family == "flux":
            out = FluxPipeline._pack_latents(out, *out.shape)
        return (out,)


ORACLE_CASES = [
    # family, teacher kwargs, prediction_type, timestep
    ("unet2d", {"prediction_type": "v_prediction", "zero_snr": True}, "v_prediction", None),  # a = 0: x0 = -v
    ("unet2d", {"prediction_type": "v_prediction", "zero_snr": False}, "v_prediction", 600),
    ("unet2d", {"prediction_type": "epsilon", "zero_snr": False}, "epsilon", None),  # 157x amplification, still exact
    ("unet2d", {"prediction_type": "epsilon", "zero_snr": False}, "epsilon", 600),
    ("unet2d", {"prediction_type": "sample", "zero_snr": True}, "sample", None),
    ("dit", {"prediction_type": "epsilon"}, "epsilon", 500),
    ("dit", {"prediction_type": "v_prediction"}, "v_prediction", None),
    ("dit", {"prediction_type": "sample"}, "sample", None),
    ("sd", {"prediction_type": "epsilon"}, "epsilon", None),
    ("sd", {"prediction_type": "v_prediction", "zero_snr": True}, "v_prediction", None),
    ("sd", {"prediction_type": "sample"}, "sample", 400),
    ("sd3", {}, "flow", None),  # sigma = 1: x0 = x_1 - v
    ("sd3", {"shift": 3.0}, "flow", 500),  # shifted sigma 0.75
    ("sd3", {"with_t5": False}, "flow", 250),
    ("flux", {}, "flow", None),
    ("flux", {}, "flow", 300),  # dynamic (resolution-dependent) shift
]


@pytest.mark.parametrize("family,teacher_kwargs,prediction_type,timestep", ORACLE_CASES)
def test_oracle_denoiser_gives_back_the_clean_sample(teachers, family, teacher_kwargs, prediction_type, timestep,
                                                    monkeypatch):
    teacher = teachers(family, **teacher_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the epsilon@999 case warns by design; pinned elsewhere
        pipe = onestep_from(teacher, timestep=timestep)
    assert pipe.config.prediction_type == prediction_type
    n = pipe.scheduler.config.num_train_timesteps
    t_index = pipe.config.timestep
    if prediction_type == "flow":
        if family == "flux":
            # resolution-dependent shift as FluxPipeline computes it, via the scheduler's own time_shift
            cfg = pipe.scheduler.config
            mu = calculate_shift((pipe.config.sample_size // 2) ** 2, cfg.base_image_seq_len, cfg.max_image_seq_len,
                                 cfg.base_shift, cfg.max_shift)
            sigma = float(pipe.scheduler.time_shift(mu, 1.0, torch.tensor(t_index / n, dtype=torch.float64)))
            expected_t = sigma  # Flux takes timestep / 1000
        else:
            sigma = float(pipe.scheduler.sigmas[n - t_index])  # the scheduler's shifted sigma table
            expected_t = sigma * n
        if timestep is None:
            assert sigma == 1.0
    else:
        expected_t = t_index
    assert t_index == (timestep if timestep is not None else (n if prediction_type == "flow" else n - 1))

    batch = 2
    shape = (batch, *pipe.noise_shape())
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    oracle = OracleForward(pipe, x0, prediction_type, expected_t, learned_sigma=(family == "dit"))
    if prediction_type == "flow":
        oracle.sigma = sigma
    monkeypatch.setattr(pipe.denoiser, "forward", oracle)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    out = pipe(**conditioning_kwargs(family, batch), latents=noise, output_type="latent").images
    assert oracle.calls == 1
    assert out.shape == x0.shape
    assert (out - x0).abs().max().item() <= 1e-5

    if pipe.is_latent:
        # images: model-space latents -> VAE latents (scaling_factor, shift_factor) -> decoder
        images = pipe(**conditioning_kwargs(family, batch), latents=noise, output_type="pt").images
        cfg = pipe.vae.config
        latents = x0 / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        with torch.no_grad():
            expected = pipe.vae.decode(latents, return_dict=False)[0]
        torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


def test_zero_terminal_snr_v_prediction_top_level_is_minus_v(teachers):
    pipe = onestep_from(teachers("unet2d"))
    assert pipe.scheduler.alphas_cumprod[pipe.config.timestep] == 0
    v = torch.randn(3, *pipe.noise_shape())
    noise = torch.randn_like(v)
    out = pipe.one_step(noise, denoiser=lambda *a, **k: (v,), decode=False)
    torch.testing.assert_close(out, -v, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ conditioning of the map
def test_epsilon_teacher_at_top_of_linear_schedule_warns_with_factor_and_fix(teachers):
    teacher = teachers("unet2d", prediction_type="epsilon", zero_snr=False)
    with pytest.warns(UserWarning, match=r"157x") as record:
        pipe = onestep_from(teacher)
    message = str(record[0].message)
    assert "v-prediction" in message and "timestep" in message and "output_bound='tanh'" in message
    assert math.isclose(pipe.amplification, 157.4, rel_tol=1e-2)


def test_well_conditioned_settings_do_not_warn(teachers):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        onestep_from(teachers("unet2d"))  # v-prediction, zero SNR
        onestep_from(teachers("unet2d", prediction_type="epsilon", zero_snr=False), timestep=200)
        onestep_from(teachers("unet2d", prediction_type="epsilon", zero_snr=False), output_bound="tanh")


def test_epsilon_at_zero_terminal_snr_is_a_clear_error(teachers):
    teacher = teachers("unet2d", prediction_type="epsilon", zero_snr=True)
    with pytest.raises(ValueError, match=r"undefined.*zero terminal SNR.*earlier `timestep`.*v-prediction"):
        onestep_from(teacher)
    onestep_from(teacher, timestep=600)  # an earlier timestep is well defined


@pytest.mark.parametrize("bound", ["tanh", "clamp"])
def test_output_bound_keeps_images_in_range(teachers, bound):
    pipe = onestep_from(teachers("unet2d"), output_bound=bound)
    big = torch.full((2, *pipe.noise_shape()), 50.0)
    out = pipe.one_step(torch.zeros_like(big), denoiser=lambda *a, **k: (big,))
    assert out.abs().max() <= 1.0
    if bound == "tanh":
        torch.testing.assert_close(out, torch.tanh(-big))


# ------------------------------------------------------------------------------------ errors
def test_unsupported_denoiser_class_lists_supported_families(teachers):
    from diffusers import UNet1DModel

    with pytest.raises(ValueError, match=r"unsupported denoiser class UNet1DModel.*unet2d \(UNet2DModel\).*sd3"):
        FDOneStepPipeline(scheduler=teachers("unet2d").scheduler, unet=UNet1DModel(block_out_channels=(8, 8, 8, 8)))


def test_unsupported_prediction_type_lists_supported_ones(teachers):
    with pytest.raises(ValueError, match=r"unsupported prediction_type 'score'.*epsilon, v_prediction, sample"):
        onestep_from(teachers("unet2d"), prediction_type="score")
    with pytest.raises(ValueError, match=r"unsupported prediction_type 'epsilon'.*flow"):
        onestep_from(teachers("sd3"), prediction_type="epsilon")


def test_from_teacher_rejects_unsupported_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "AudioLDMPipeline", "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet1DModel"]}))
    with pytest.raises(ValueError, match=r"unsupported unet class UNet1DModel.*supported families"):
        FDOneStepPipeline.from_teacher(str(tmp_path))


def test_wrong_conditioning_is_a_clear_error(teachers):
    sd = onestep_from(teachers("sd"))
    with pytest.raises(ValueError, match="text-conditioned: pass `prompt`"):
        sd(batch_size=None)
    dit = onestep_from(teachers("dit"))
    with pytest.raises(ValueError, match="class-conditional .*pass `class_labels`"):
        dit()
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 9\]"):
        dit(class_labels=[10])
    unet = onestep_from(teachers("unet2d"))
    with pytest.raises(ValueError, match="takes no prompt"):
        unet(prompt="a cat")
    with pytest.raises(ValueError, match="latents must have shape"):
        unet(latents=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="output_type"):
        unet(output_type="jpg")


# ------------------------------------------------------------------------------------ outputs and batching
def test_every_output_type_follows_diffusers_conventions(teachers):
    pipe = onestep_from(teachers("unet2d"))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pil = pipe(batch_size=2, generator=g()).images
    assert isinstance(pil, list) and len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (16, 16)
    np_img = pipe(batch_size=2, generator=g(), output_type="np").images
    assert isinstance(np_img, np.ndarray) and np_img.shape == (2, 16, 16, 1)
    assert np_img.min() >= 0 and np_img.max() <= 1
    pt = pipe(batch_size=2, generator=g(), output_type="pt").images
    assert pt.shape == (2, 1, 16, 16) and pt.min() >= 0 and pt.max() <= 1
    np.testing.assert_allclose(np_img, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    raw = pipe(batch_size=2, generator=g(), output_type="latent").images
    torch.testing.assert_close(pt, (raw / 2 + 0.5).clamp(0, 1))
    assert np.array_equal(np.asarray(pil[0]), (np_img[0, ..., 0] * 255).round().astype(np.uint8))
    out = pipe(batch_size=1, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    assert isinstance(pipe(batch_size=1), ImagePipelineOutput)


@pytest.mark.parametrize("family", ["unet2d", "dit", "sd", "sd3", "flux"])
def test_batching_matches_per_sample_generation(teachers, family):
    pipe = onestep_from(teachers(family))
    kwargs = conditioning_kwargs(family, 2)
    noise = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(3))
    both = pipe(**kwargs, latents=noise, output_type="pt").images
    for i in range(2):
        single = {k: (v[i : i + 1] if isinstance(v, list) else 1) for k, v in kwargs.items()}
        one = pipe(**single, latents=noise[i : i + 1], output_type="pt").images
        torch.testing.assert_close(one, both[i : i + 1], rtol=0, atol=1e-5)
    assert both.shape == (2, *pipe.image_shape())


def test_num_images_per_prompt_and_generator_reproducibility(teachers):
    pipe = onestep_from(teachers("sd"))
    a = pipe(prompt=["a cab", "dog"], num_images_per_prompt=3, generator=torch.Generator().manual_seed(5),
             output_type="pt").images
    b = pipe(prompt=["a cab", "dog"], num_images_per_prompt=3, generator=torch.Generator().manual_seed(5),
             output_type="pt").images
    assert a.shape == (6, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # different noise per image of a prompt


def test_class_labels_and_prompts_change_the_output(teachers):
    dit = onestep_from(teachers("dit"))
    noise = torch.randn(1, *dit.noise_shape())
    a = dit(class_labels=[1], latents=noise, output_type="latent").images
    b = dit(class_labels=[2], latents=noise, output_type="latent").images
    assert not torch.allclose(a, b)
    sd = onestep_from(teachers("sd"))
    noise = torch.randn(1, *sd.noise_shape())
    assert not torch.allclose(sd(prompt="cab", latents=noise, output_type="latent").images,
                              sd(prompt="zzz", latents=noise, output_type="latent").images)


# ------------------------------------------------------------------------------------ guidance
@pytest.mark.parametrize("family", ["dit", "sd", "sd3"])
def test_guidance_is_one_batched_forward_combining_cond_and_uncond(teachers, family, monkeypatch):
    pipe = onestep_from(teachers(family))
    noise = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(4))
    kwargs = conditioning_kwargs(family, 2)
    cond = pipe(**kwargs, latents=noise, output_type="latent", guidance_scale=1.0).images
    if family == "dit":
        # the unconditional branch is the null label
        null = OneStepConditioning(class_labels=torch.full((2,), pipe.config.null_class_label))
        uncond = pipe.one_step(noise, null, decode=False, guidance_scale=1.0)
    else:
        # the unconditional branch is the (default empty) negative prompt
        uncond = pipe(prompt=["", ""], latents=noise, output_type="latent", guidance_scale=1.0).images
    calls = []
    original = pipe.denoiser.forward

    def counting(*args, **kw):
        calls.append((args[0] if args else kw["hidden_states"]).shape[0])
        return original(*args, **kw)

    monkeypatch.setattr(pipe.denoiser, "forward", counting)
    guided = pipe(**kwargs, latents=noise, output_type="latent", guidance_scale=4.0).images
    assert calls == [4]  # one forward over [cond; uncond]
    # the conversion is linear in the model output, so guidance in x0 space equals guidance in output space
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_class_conditional_unet_with_a_null_class_has_one_class_fewer_and_guides_with_it():
    from test_pipeline_tiny_models import ddpm_teacher

    torch.manual_seed(0)
    teacher = ddpm_teacher(num_class_embeds=4)  # classes 0, 1, 2 and the null class 3
    pipe = FDOneStepPipeline(unet=teacher.unet, scheduler=teacher.scheduler, timestep=600, null_class_label=3)
    assert pipe.num_classes == 3 and pipe.is_class_conditional
    from fd_onestep.onestep import num_label_classes

    assert num_label_classes(pipe) == 3  # what a generator asks labels of: the null class excluded
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 2\]"):
        pipe(class_labels=[3])  # the null class is not a class one can ask for
    noise = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(4))
    cond = pipe(class_labels=[0, 2], latents=noise, output_type="pt", guidance_scale=1.0).images
    null = OneStepConditioning(class_labels=torch.full((2,), 3))
    uncond = pipe.one_step(noise, null, guidance_scale=1.0)
    guided = pipe.one_step(noise, OneStepConditioning(class_labels=torch.tensor([0, 2])), guidance_scale=2.5)
    cond_x0 = pipe.one_step(noise, OneStepConditioning(class_labels=torch.tensor([0, 2])), guidance_scale=1.0)
    torch.testing.assert_close(guided, uncond + 2.5 * (cond_x0 - uncond), rtol=1e-4, atol=1e-4)
    assert cond.shape == (2, 1, 16, 16)
    without_null = FDOneStepPipeline(unet=teacher.unet, scheduler=teacher.scheduler, timestep=600)
    assert without_null.num_classes == 4  # a model trained without a null class: every embedding is a class


def test_a_unet_null_class_that_is_not_the_last_embedding_is_refused_naming_the_fix():
    from test_pipeline_tiny_models import ddpm_teacher

    teacher = ddpm_teacher(num_class_embeds=4)
    with pytest.raises(ValueError, match="must be the last class embedding, 3"):
        FDOneStepPipeline(unet=teacher.unet, scheduler=teacher.scheduler, timestep=600, null_class_label=0)
    plain = ddpm_teacher()
    with pytest.raises(ValueError, match="num_class_embeds=None"):
        FDOneStepPipeline(unet=plain.unet, scheduler=plain.scheduler, timestep=600, null_class_label=0)


def test_guidance_scale_is_stored_in_the_pipeline_config(teachers, tmp_path):
    pipe = onestep_from(teachers("sd"), guidance_scale=3.0)
    noise = torch.randn(1, *pipe.noise_shape())
    stored = pipe(prompt="cab", latents=noise, output_type="latent").images
    explicit = pipe(prompt="cab", latents=noise, output_type="latent", guidance_scale=3.0).images
    torch.testing.assert_close(stored, explicit, rtol=0, atol=0)
    pipe.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["guidance_scale"] == 3.0


def test_unconditional_unet_has_no_guidance(teachers):
    pipe = onestep_from(teachers("unet2d"))
    with pytest.raises(ValueError, match="guidance needs a conditional model"):
        pipe(batch_size=1, guidance_scale=2.0)


# ------------------------------------------------------------------------------------ from_teacher, save, load
@pytest.fixture(scope="module")
def saved_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for name in TEACHERS:
        torch.manual_seed(0)
        TEACHERS[name]().save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@pytest.mark.parametrize("family", list(TEACHERS))
def test_from_teacher_detects_family_and_both_load_routes_reproduce_images_exactly(saved_teachers, family, tmp_path):
    pipe = FDOneStepPipeline.from_teacher(saved_teachers[family], **FAMILY_KWARGS.get(family, {}))
    assert pipe.family == family
    # only what the one step needs is loaded (no safety checker, no feature extractor)
    assert set(pipe.components) <= _SIGNATURE
    kwargs = conditioning_kwargs(family, 2)
    reference = pipe(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np").images

    out_dir = tmp_path / "onestep"
    pipe.save_pretrained(out_dir)
    assert (out_dir / "pipeline_fd_onestep.py").is_file()
    index = json.loads((out_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FDOneStepPipeline" and index["family"] == family
    assert index["timestep"] == pipe.config.timestep and index["prediction_type"] == pipe.config.prediction_type

    ours = FDOneStepPipeline.from_pretrained(out_dir)
    assert type(ours) is FDOneStepPipeline and ours.config.timestep == pipe.config.timestep
    stock = DiffusionPipeline.from_pretrained(out_dir, custom_pipeline="pipeline_fd_onestep", trust_remote_code=True)
    assert type(stock).__name__ == "FDOneStepPipeline" and type(stock) is not FDOneStepPipeline  # the folder's copy
    for loaded in (ours, stock):
        again = loaded(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np").images
        assert np.array_equal(again, reference)


def test_saved_settings_survive_the_round_trip(teachers, tmp_path):
    pipe = onestep_from(teachers("unet2d", prediction_type="epsilon", zero_snr=False), timestep=600,
                        output_bound="tanh")
    pipe.save_pretrained(tmp_path)
    loaded = FDOneStepPipeline.from_pretrained(tmp_path)
    for key in ("family", "timestep", "prediction_type", "guidance_scale", "output_bound", "sample_size"):
        assert loaded.config[key] == pipe.config[key]


def test_the_shipped_file_is_self_contained():
    import fd_onestep.pipelines.pipeline_fd_onestep as module

    source = open(module.__file__).read()
    imported = {line.split()[1].split(".")[0] for line in source.splitlines()
                if line.strip().startswith(("import ", "from ")) and not line.strip().startswith("from .")}
    stdlib = {"__future__", "copy", "inspect", "json", "math", "os", "shutil", "warnings", "dataclasses"}
    # peft, accelerate and safetensors only inside the LoRA functions (diffusers' custom-pipeline loader merely warns)
    assert imported <= stdlib | {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"}, imported
    top_level = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert top_level <= stdlib | {"torch", "diffusers", "transformers"}, top_level
    classes = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, DiffusionPipeline)
               and v.__module__ == module.__name__]
    assert classes == [FDOneStepPipeline]  # diffusers' custom-pipeline loader needs exactly one


def test_one_step_is_differentiable_through_the_vae(teachers):
    pipe = onestep_from(teachers("sd"))
    cond = pipe.encode_conditioning(prompt=["cab"], device="cpu")
    noise = torch.randn(1, *pipe.noise_shape())
    images = pipe.one_step(noise, cond)
    images.square().mean().backward()
    grads = [p.grad for p in pipe.unet.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_lora_state_dict_sees_through_data_parallel_and_compile_wrappers(teachers):
    import copy

    from fd_onestep.pipelines.pipeline_fd_onestep import add_lora_to_denoiser, denoiser_lora_state_dict

    model = add_lora_to_denoiser(copy.deepcopy(teachers("unet2d").unet), rank=2)
    plain = denoiser_lora_state_dict(model)
    assert plain and all(".lora_A." in k or ".lora_B." in k for k in plain)
    # what accelerator.prepare makes of a model: DataParallel / DDP inside, torch.compile outside
    for wrapped in (torch.nn.DataParallel(model), torch.compile(model), torch.compile(torch.nn.DataParallel(model))):
        state = denoiser_lora_state_dict(wrapped)
        assert state.keys() == plain.keys()
        assert all(state[k] is plain[k] or torch.equal(state[k], plain[k]) for k in plain)


# ------------------------------------------------------------------------------------ what users copy, clear errors
def test_from_teacher_on_a_model_folder_says_a_pipeline_folder_is_needed(saved_teachers, tmp_path):
    import shutil

    unet_folder = saved_teachers["unet2d"] + "/unet"
    with pytest.raises(FileNotFoundError) as err:
        FDOneStepPipeline.from_teacher(unet_folder)
    message = str(err.value)
    assert "no model_index.json" in message and "UNet2DModel" in message and "scheduler" in message
    assert "pass that folder instead" in message and saved_teachers["unet2d"] in message
    assert err.value.__context__ is None  # our own error, not one raised under diffusers' traceback
    # the same model copied out of its pipeline: how to build the pipeline around it
    bare = tmp_path / "my-unet"
    shutil.copytree(unet_folder, bare)
    with pytest.raises(FileNotFoundError, match=r"model_index\.json.*scheduler.*DDPMPipeline\(unet=UNet2DModel"):
        FDOneStepPipeline.from_teacher(str(bare))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        FDOneStepPipeline.from_teacher(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        FDOneStepPipeline.from_teacher(str(tmp_path / "typo" / "teacher"))


def test_from_teacher_with_an_uncached_hub_id_while_offline_says_how_to_download(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as err:
        FDOneStepPipeline.from_teacher("fd-onestep-tests/never-cached-teacher")
    message = str(err.value)
    assert "offline (HF_HUB_OFFLINE=1)" in message and "no copy" in message and "local cache" in message
    assert "`hf download fd-onestep-tests/never-cached-teacher`" in message and "--local-dir" in message
    assert "model_index.json" not in message  # diffusers' error blamed a file; the problem is the missing download
    assert err.value.__suppress_context__  # raised `from None`: no 50-line diffusers traceback under it


def test_diffusers_style_num_inference_steps_is_accepted_when_one(teachers):
    pipe = onestep_from(teachers("unet2d"))
    kwargs = {"batch_size": 2, "output_type": "np"}
    reference = pipe(**kwargs, generator=torch.Generator().manual_seed(3)).images
    for steps in (1, None):
        again = pipe(**kwargs, generator=torch.Generator().manual_seed(3), num_inference_steps=steps).images
        assert np.array_equal(again, reference)
    with pytest.raises(ValueError, match="a one-step pipeline: num_inference_steps must be 1"):
        pipe(**kwargs, num_inference_steps=20)


def test_from_teacher_takes_dtype_under_the_name_the_installed_diffusers_takes(saved_teachers, monkeypatch):
    import fd_onestep.pipelines.pipeline_fd_onestep as module

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # `torch_dtype` is deprecated from diffusers 0.40 on
        pipe = FDOneStepPipeline.from_teacher(saved_teachers["unet2d"], dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    # diffusers < 0.40 only knows `torch_dtype`: from_teacher hands `dtype` on under that name
    seen = {}
    monkeypatch.setattr(module, "FROM_PRETRAINED_DTYPE_KWARG", "torch_dtype")
    monkeypatch.setattr(FDOneStepPipeline, "from_pretrained", classmethod(lambda cls, path, **kw: seen.update(kw)))
    FDOneStepPipeline.from_teacher(saved_teachers["unet2d"], dtype=torch.bfloat16)
    assert seen["torch_dtype"] == torch.bfloat16 and "dtype" not in seen


def test_sd3_timestep_reaches_a_bf16_transformer_in_float32_as_the_stock_pipeline_passes_it(teachers):
    import copy

    pipe = onestep_from(teachers("sd3"), timestep=700)
    pipe = pipe.with_denoiser(copy.deepcopy(pipe.transformer).to(torch.bfloat16))
    seen = {}
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    cond = pipe.encode_conditioning(prompt=["cab"], device="cpu")
    pipe.one_step(torch.randn(1, *pipe.noise_shape()), cond, decode=False)
    sigma = pipe.noise_level()["sigma"]
    assert seen["timestep"].dtype == torch.float32  # bf16 would round 875.0 to 876
    assert seen["timestep"].item() == torch.tensor(sigma * 1000, dtype=torch.float32).item()
    assert seen["hidden_states"].dtype == torch.bfloat16
