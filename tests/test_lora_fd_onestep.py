"""LoRA for every family: add -> save (diffusers format) -> load -> fuse / unfuse / unload."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors import safe_open
from test_pipeline_tiny_models import FAMILY_KWARGS, TEACHERS

from fd_onestep.pipelines.pipeline_fd_onestep import (
    FDOneStepPipeline,
    add_lora_to_denoiser,
    denoiser_lora_state_dict,
)

pytestmark = pytest.mark.filterwarnings("ignore:ill-conditioned one-step map")
_SIGNATURE = set(inspect.signature(FDOneStepPipeline.__init__).parameters)
FAMILIES = list(TEACHERS)


def fresh_pipeline(family) -> FDOneStepPipeline:
    torch.manual_seed(0)
    teacher = TEACHERS[family]()
    components = {k: v for k, v in teacher.components.items() if k in _SIGNATURE}
    # epsilon teachers (DiT, SD) one step at t=500, where x0 does not amplify float32 rounding of the
    # denoiser 157x: these tests pin the LoRA plumbing, not the conditioning of the map
    settings = {"timestep": 500} if family in ("dit", "sd", "sdxl") else {}
    return FDOneStepPipeline(**components, **FAMILY_KWARGS.get(family, {}), **settings)


def call_kwargs(family):
    if family == "dit":
        return {"class_labels": [3, 4]}
    if FDOneStepPipeline.FAMILY_ADAPTERS[family].conditioning == "text":
        return {"prompt": ["a cab", "dog"]}
    return {"batch_size": 2}


def generate(pipe, family, noise):
    return pipe(**call_kwargs(family), latents=noise, output_type="latent").images


def trained_lora(pipe, rank=4):
    """Add a LoRA and give it non-zero weights, as a finished training run would."""
    add_lora_to_denoiser(pipe.denoiser, rank=rank)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in pipe.denoiser.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return pipe


@pytest.fixture(scope="module")
def saved_loras(tmp_path_factory):
    """For every family: the base outputs, the outputs with the trained LoRA, and the saved LoRA folder."""
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for family in FAMILIES:
        pipe = fresh_pipeline(family)
        noise = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(1))
        base = generate(pipe, family, noise)
        trained_lora(pipe)
        assert all(p.requires_grad == ("lora_" in n) for n, p in pipe.denoiser.named_parameters())
        with_lora = generate(pipe, family, noise)
        path = pipe.save_lora(root / family)
        out[family] = {"noise": noise, "base": base, "with_lora": with_lora, "dir": root / family, "file": path}
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_is_diffusers_format_with_peft_config_metadata(saved_loras, family):
    info = saved_loras[family]
    assert info["file"].endswith("pytorch_lora_weights.safetensors")
    prefix = "unet" if family in ("unet2d", "sd", "sdxl") else "transformer"
    with safe_open(info["file"], framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith(prefix + ".") for k in keys)
    assert any(k.endswith("lora_A.weight") for k in keys) and any(k.endswith("lora_B.weight") for k in keys)
    config = json.loads(meta["lora_adapter_metadata"])  # PEFT LoraConfig, keys prefixed as diffusers writes them
    assert config[f"{prefix}.r"] == 4 and config[f"{prefix}.lora_alpha"] == 4
    assert set(config[f"{prefix}.target_modules"]) >= {"to_q", "to_k", "to_v"}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_loads_and_fuse_then_unfuse_restores_outputs(saved_loras, family):
    info = saved_loras[family]
    pipe = fresh_pipeline(family)
    noise = info["noise"]
    torch.testing.assert_close(generate(pipe, family, noise), info["base"], rtol=0, atol=0)

    pipe.load_lora_weights(info["dir"], adapter_name="onestep")
    loaded = generate(pipe, family, noise)
    assert not torch.allclose(loaded, info["base"], atol=1e-4)  # the LoRA changes the map
    torch.testing.assert_close(loaded, info["with_lora"], rtol=0, atol=1e-5)  # ...exactly as trained

    pipe.fuse_lora()
    torch.testing.assert_close(generate(pipe, family, noise), info["with_lora"], rtol=0, atol=1e-4)
    pipe.unfuse_lora()
    torch.testing.assert_close(generate(pipe, family, noise), info["with_lora"], rtol=0, atol=1e-5)

    pipe.unload_lora_weights()
    assert not any("lora_" in n for n, _ in pipe.denoiser.named_parameters())
    torch.testing.assert_close(generate(pipe, family, noise), info["base"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["unet2d", "sd"])
def test_fused_weights_differ_and_unfuse_restores_base_weights(saved_loras, family):
    pipe = fresh_pipeline(family)
    before = {k: v.clone() for k, v in pipe.denoiser.state_dict().items()}
    pipe.load_lora_weights(saved_loras[family]["dir"])
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights
    after = pipe.denoiser.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    fused = generate(pipe, family, saved_loras[family]["noise"])
    torch.testing.assert_close(fused, saved_loras[family]["with_lora"], rtol=0, atol=1e-4)


def test_one_step_sd_lora_loads_into_stock_stable_diffusion_pipeline(saved_loras):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    stock = TEACHERS["sd"]()
    assert type(stock) is StableDiffusionPipeline
    unet_before = {k: v.clone() for k, v in stock.unet.state_dict().items()}
    stock.load_lora_weights(saved_loras["sd"]["dir"], adapter_name="onestep")
    assert "onestep" in stock.get_active_adapters()
    # the stock UNet with the LoRA is the trained one-step denoiser: same one-step outputs
    pipe = fresh_pipeline("sd")
    pipe.register_modules(unet=stock.unet)
    torch.testing.assert_close(generate(pipe, "sd", saved_loras["sd"]["noise"]), saved_loras["sd"]["with_lora"],
                               rtol=0, atol=1e-5)
    stock.fuse_lora()
    stock.unfuse_lora()
    stock.unload_lora_weights()
    for k, v in stock.unet.state_dict().items():
        torch.testing.assert_close(v, unet_before[k], rtol=0, atol=1e-5)


def test_lora_state_dict_requires_an_adapter():
    pipe = fresh_pipeline("unet2d")
    with pytest.raises(ValueError, match="no LoRA adapter.*add_lora_to_denoiser"):
        denoiser_lora_state_dict(pipe.denoiser)
    with pytest.raises(ValueError, match="no LoRA is loaded"):
        pipe.fuse_lora()


def test_save_lora_weights_from_a_training_state_dict(tmp_path):
    """The training-script route: PEFT-wrapped denoiser -> state dict -> classmethod save -> load."""
    pipe = trained_lora(fresh_pipeline("dit"))
    state = denoiser_lora_state_dict(pipe.denoiser)
    path = FDOneStepPipeline.save_lora_weights(tmp_path, state, family="dit",
                                               lora_config=pipe.denoiser.peft_config["default"])
    other = fresh_pipeline("dit")
    other.load_lora_weights(path)
    for name, value in state.items():
        loaded = dict(other.denoiser.named_parameters())
        match = [v for k, v in loaded.items() if k.replace(".default_0", "") == name]
        assert match and torch.equal(match[0], value)


def test_a_convolution_lora_of_a_channels_last_denoiser_saves_and_loads_back(tmp_path):
    """--channels_last with conv LoRA targets (the unet2d default: conv1, conv2): the LoRA's 4-D weights are
    channels_last; the saved file holds them contiguous, with the same values."""
    pipe = fresh_pipeline("unet2d")
    trained_lora(pipe)
    pipe.denoiser.to(memory_format=torch.channels_last)  # the training script's order: LoRA, then the layout
    assert any(not p.is_contiguous() for n, p in pipe.denoiser.named_parameters() if "lora_A" in n)
    noise = torch.randn(2, *pipe.noise_shape(), generator=torch.Generator().manual_seed(1))
    expected = generate(pipe, "unet2d", noise)
    pipe.save_lora(tmp_path / "lora")
    other = fresh_pipeline("unet2d")
    other.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(generate(other, "unet2d", noise), expected, rtol=0, atol=1e-5)
