"""The stock diffusers pipelines take exactly the one step of FDOneStepPipeline with `stock_one_step()`'s scheduler
and call arguments (the LCM-LoRA / TCD way of shipping a one-step LoRA): same noise in, same images out."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import DDPMPipeline
from test_lora_fd_onestep import trained_lora
from test_pipeline_tiny_models import FAMILY_KWARGS, TEACHERS

from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

pytestmark = pytest.mark.filterwarnings("ignore:ill-conditioned one-step map")
_SIGNATURE = set(inspect.signature(FDOneStepPipeline.__init__).parameters)


def _pair(family, teacher=None, **settings):
    """A teacher (stock pipeline) and the one-step pipeline over the same components."""
    torch.manual_seed(0)
    stock = (teacher or TEACHERS[family])()
    stock.set_progress_bar_config(disable=True)
    components = {k: v for k, v in stock.components.items() if k in _SIGNATURE}
    return stock, FDOneStepPipeline(**components, **{**FAMILY_KWARGS.get(family, {}), **settings})


def _same_step(stock, pipe, call):
    recipe = pipe.stock_one_step()
    stock.scheduler = recipe["scheduler"]
    # the same generator: the stock pipelines draw the same noise from it (Flux packs it afterwards)
    ours = pipe(**call, generator=torch.Generator().manual_seed(5), output_type="pt").images
    theirs = stock(**call, generator=torch.Generator().manual_seed(5), output_type="pt", **recipe["call_kwargs"]).images
    theirs = torch.as_tensor(theirs) if not isinstance(theirs, torch.Tensor) else theirs
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)
    return ours


@pytest.mark.parametrize("settings", [{"timestep": 999}, {"timestep": 500}, {"timestep": 500, "guidance_scale": 3.0}])
def test_stock_stable_diffusion_pipeline_with_the_lora_takes_the_same_one_step(settings):
    stock, pipe = _pair("sd", output_bound="clamp", **settings)
    trained_lora(pipe)  # the LoRA lives in the shared UNet: the stock pipeline runs the trained one-step denoiser
    _same_step(stock, pipe, {"prompt": ["a cab", "dog"]})


@pytest.mark.parametrize("family,settings", [("sd3", {}), ("sd3", {"timestep": 700, "guidance_scale": 2.0}),
                                             ("flux", {}), ("flux", {"timestep": 800}), ("flux", {"guidance_scale": 2.0})])
def test_stock_flow_matching_pipelines_take_the_same_one_step(family, settings):
    stock, pipe = _pair(family, **settings)
    _same_step(stock, pipe, {"prompt": ["a cab", "dog"]})


def test_stock_flux_pipeline_gives_a_guidance_distilled_model_its_guidance_embedding():
    from test_pipeline_tiny_models import flux_teacher

    stock, pipe = _pair("flux", teacher=lambda: flux_teacher(guidance_embeds=True), guidance_scale=3.5)
    assert pipe.stock_one_step()["call_kwargs"]["guidance_scale"] == 3.5
    _same_step(stock, pipe, {"prompt": ["a cab", "dog"]})


@pytest.mark.parametrize("prediction_type,timestep", [("v_prediction", 600), ("epsilon", 400)])
def test_stock_ddpm_pipeline_takes_the_same_one_step(prediction_type, timestep):
    from test_pipeline_tiny_models import ddpm_teacher

    torch.manual_seed(0)
    teacher = ddpm_teacher(prediction_type, zero_snr=prediction_type == "v_prediction")
    pipe = FDOneStepPipeline(unet=teacher.unet, scheduler=teacher.scheduler, timestep=timestep)
    recipe = pipe.stock_one_step()
    stock = DDPMPipeline(unet=teacher.unet, scheduler=recipe["scheduler"])
    stock.set_progress_bar_config(disable=True)
    theirs = stock(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="np", **recipe["call_kwargs"]).images
    ours = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="np").images
    assert abs(theirs - ours).max() <= 2e-5


def test_what_the_stock_pipelines_cannot_reproduce_is_refused_naming_the_fix():
    _, pipe = _pair("sd", output_bound="tanh", timestep=500)
    with pytest.raises(ValueError, match="--output_bound clamp"):
        pipe.stock_one_step()
