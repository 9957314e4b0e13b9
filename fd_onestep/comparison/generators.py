"""Generator callables for the comparison, built from diffusers pipelines.

A generator is any ``generate(batch_size: int, generator: torch.Generator) -> Tensor`` returning float
images (batch_size, C, H, W) in [-1, 1]; ``generate.description`` says how it samples (e.g. "ddim 50 steps").
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["GeneratorFn", "teacher_sampler", "naive_one_step_teacher", "one_step_pipeline"]

GeneratorFn = Callable[[int, torch.Generator], torch.Tensor]


def _check_unconditional(pipeline) -> None:
    for attr in ("unet", "scheduler"):
        if not hasattr(pipeline, attr):
            raise TypeError(
                f"{type(pipeline).__name__} has no `{attr}`; pass an unconditional diffusers pipeline such as "
                "DDPMPipeline (a UNet2DModel `unet` and a scheduler)."
            )


def _image_shape(unet, batch_size: int) -> tuple[int, ...]:
    """(batch_size, in_channels, H, W) of the UNet's samples (``sample_size`` an int or (H, W))."""
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (batch_size, unet.config.in_channels, *size)


def teacher_sampler(
    pipeline,
    num_inference_steps: int = 20,
    scheduler: str = "dpmsolver++",
) -> GeneratorFn:
    """The teacher's own multi-step sampler as a generator callable.

    Args:
        pipeline: an unconditional diffusers pipeline (``DDPMPipeline``); its weights are not copied.
        num_inference_steps: solver steps (each one UNet evaluation).
        scheduler: ``"dpmsolver++"`` (``DPMSolverMultistepScheduler``, 2nd order), ``"ddim"``
            (``DDIMScheduler``, eta = 0) or ``"ddpm"`` (the pipeline's own ancestral ``DDPMScheduler``);
            built with ``from_config`` of the teacher's scheduler, so prediction type, betas (zero terminal
            SNR included) and timestep spacing are the teacher's.
    Returns:
        ``generate(batch_size, generator) -> (batch_size, C, H, W) float32 in [-1, 1]``.
    """
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler
    from diffusers.image_processor import VaeImageProcessor

    _check_unconditional(pipeline)
    classes = {"dpmsolver++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if scheduler not in classes:
        raise ValueError(f"unknown sampler {scheduler!r}; choose one of {sorted(classes)}.")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}.")
    sampler = DDPMPipeline(unet=pipeline.unet, scheduler=classes[scheduler].from_config(pipeline.scheduler.config))
    sampler.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def generate(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        images = sampler(
            batch_size=batch_size, generator=generator, num_inference_steps=num_inference_steps, output_type="pt"
        ).images  # [0, 1]
        return VaeImageProcessor.normalize(images)

    generate.description = f"{scheduler} {num_inference_steps} steps"
    return generate


def naive_one_step_teacher(pipeline, timestep: Optional[int] = None) -> GeneratorFn:
    """The teacher used naively in one step: pure noise at the top timestep, read the clean-sample estimate.

    x0 = (x_T - sqrt(1 - a_T) eps) / sqrt(a_T) (epsilon), sqrt(a_T) x_T - sqrt(1 - a_T) v (v-prediction),
    or the output itself (sample), with a_T = alphas_cumprod[timestep] -- the one-step pipeline's own
    conversion (``noise_level`` / ``prediction_to_sample`` of ``pipeline_fd_onestep``). With zero-terminal-SNR
    betas a_T = 0 at T and the v-prediction estimate is exactly -v.

    Args:
        pipeline: an unconditional diffusers pipeline with a DDPM-style scheduler (``alphas_cumprod``).
        timestep: default the last training timestep (num_train_timesteps - 1).
    Returns:
        ``generate(batch_size, generator) -> (batch_size, C, H, W) float32``, *not* clamped (the comparison
        clamps to [-1, 1] as saving images would, and reports the clamped fraction).
    """
    from ..pipelines.pipeline_fd_onestep import noise_level, prediction_to_sample

    _check_unconditional(pipeline)
    config = pipeline.scheduler.config
    t = int(config.num_train_timesteps - 1 if timestep is None else timestep)
    level = noise_level(pipeline.scheduler, t)  # raises for a timestep outside the schedule
    if level["kind"] != "ddpm":
        raise ValueError(
            f"{type(pipeline.scheduler).__name__} is a flow-matching scheduler; the naive one-step teacher takes a "
            "DDPM-style scheduler (alphas_cumprod), e.g. the DDPMScheduler of a DDPMPipeline."
        )
    alpha_bar = level["alpha_prod"]
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type == "epsilon" and alpha_bar < 1e-8:
        raise ValueError(
            f"an epsilon-prediction teacher cannot predict x0 at t={t}: alphas_cumprod[t]={alpha_bar:.3g}; "
            "pass a smaller timestep."
        )
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}: use epsilon, v_prediction or sample.")
    unet = pipeline.unet

    @torch.no_grad()
    def generate(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        device = unet.device
        x_t = torch.randn(_image_shape(unet, batch_size), generator=generator, device=generator.device).to(
            device, unet.dtype
        )
        out = unet(x_t, torch.full((batch_size,), t, device=device)).sample.float()
        return prediction_to_sample(out, x_t.float(), prediction_type, level)

    generate.description = f"1 step (x0 estimate at t={t})"
    return generate


def one_step_pipeline(pipeline) -> GeneratorFn:
    """A trained unconditional ``FDOneStepPipeline`` (e.g. ``FDOneStepPipeline.from_pretrained(output_dir)``)
    as a generator callable: one denoiser forward per batch, with the pipeline's own noise draw and output
    bound.

    Returns:
        ``generate(batch_size, generator) -> (batch_size, C, H, W) float32`` in [-1, 1].
    """
    from diffusers.image_processor import VaeImageProcessor

    if getattr(pipeline, "is_text_conditional", False) or getattr(pipeline, "is_class_conditional", False):
        raise ValueError(
            "one_step_pipeline takes an unconditional FDOneStepPipeline; wrap a conditional one in your own "
            "generate(batch_size, generator) that picks the prompts or class labels."
        )

    @torch.no_grad()
    def generate(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        images = pipeline(batch_size=batch_size, generator=generator, output_type="pt").images  # [0, 1]
        return VaeImageProcessor.normalize(images)

    generate.description = "1 step"
    return generate
