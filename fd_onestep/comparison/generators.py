"""Generator callables for the comparison, built from diffusers pipelines.

A generator is any ``generate(batch_size: int, generator: torch.Generator, class_labels=None) -> Tensor``
returning float images (batch_size, C, H, W) in [-1, 1]; ``generate.description`` says how it samples (e.g.
"ddim 50 steps"). Class-conditional generators take ``class_labels`` (batch_size,) int64, one requested class
per image; unconditional ones may take only the first two arguments (the comparison passes the third only when
it compares class-conditional generators).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["GeneratorFn", "teacher_sampler", "naive_one_step_teacher", "one_step_pipeline", "scheduler_loop",
           "prompted_pipeline"]

# generate(batch_size, generator) or generate(batch_size, generator, class_labels) -> (B, C, H, W) in [-1, 1]
GeneratorFn = Callable[..., torch.Tensor]


def _check_unet_pipeline(pipeline) -> None:
    for attr in ("unet", "scheduler"):
        if not hasattr(pipeline, attr):
            raise TypeError(
                f"{type(pipeline).__name__} has no `{attr}`; pass a diffusers pipeline such as DDPMPipeline "
                "(a UNet2DModel `unet`, unconditional or class-conditional, and a scheduler)."
            )


def _num_class_embeds(unet) -> Optional[int]:
    """The UNet's number of class embeddings (None: an unconditional UNet2DModel)."""
    return unet.config.get("num_class_embeds")


def _checked_labels(class_labels, num_classes: Optional[int], batch_size: int, model: str) -> Optional[torch.Tensor]:
    """``class_labels`` (tensor or list of ints) as a checked (batch_size,) int64 CPU tensor; None for an
    unconditional ``model`` (``num_classes`` None).

    Raises ``ValueError`` for labels given to an unconditional model, missing labels of a class-conditional one,
    or labels of the wrong count, dtype or range (``[0, num_classes)``).
    """
    from ..conditioning_metrics import check_labels

    if num_classes is None:
        if class_labels is not None:
            raise ValueError(f"this {model} is unconditional: drop class_labels.")
        return None
    if class_labels is None:
        raise ValueError(
            f"this {model} is class-conditional ({num_classes} classes): pass class_labels, a ({batch_size},) "
            "int64 tensor with one class per image."
        )
    labels = torch.as_tensor(class_labels)
    check_labels(labels, num_classes, batch_size, name="class_labels")
    return labels.to("cpu", torch.int64)


def _image_shape(unet, batch_size: int) -> tuple[int, ...]:
    """(batch_size, in_channels, H, W) of the UNet's samples (``sample_size`` an int or (H, W))."""
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (batch_size, unet.config.in_channels, *size)


@torch.no_grad()
def scheduler_loop(
    unet,
    scheduler,
    batch_size: int,
    generator: Optional[torch.Generator],
    num_inference_steps: int,
    class_labels: Optional[torch.Tensor] = None,
    *,
    guidance_scale: float = 1.0,
    null_class_label: Optional[int] = None,
) -> torch.Tensor:
    """The sampling loop of ``DDPMPipeline.__call__``, with class labels and classifier-free guidance.

    Noise ``randn_tensor((B, C, H, W), generator, unet device, unet dtype)``, ``scheduler.set_timesteps``, then per
    timestep ``scale_model_input``, ``unet(x, t, class_labels=...)`` and ``scheduler.step(..., generator=generator)``.
    With ``guidance_scale > 1`` the conditional and the ``null_class_label`` branches run as one batch and the
    prediction is ``uncond + guidance_scale * (cond - uncond)``.

    Args:
        unet: a ``UNet2DModel``; ``scheduler``: a diffusers scheduler (its timesteps are set here).
        class_labels: (B,) int64 classes, or None for an unconditional UNet (then the loop is DDPMPipeline's).
    Returns:
        (B, C, H, W) images in [0, 1] (``(x / 2 + 0.5).clamp(0, 1)``, DDPMPipeline's ``output_type="pt"``).
    """
    from diffusers.utils.torch_utils import randn_tensor

    guided = guidance_scale > 1
    if guided and (class_labels is None or null_class_label is None):
        raise ValueError("classifier-free guidance needs class_labels and the null_class_label to batch them with.")
    device = unet.device
    x = randn_tensor(_image_shape(unet, batch_size), generator=generator, device=device, dtype=unet.dtype)
    labels = None if class_labels is None else class_labels.to(device)
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, int(null_class_label))])
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        if guided:
            cond, uncond = unet(torch.cat([model_input, model_input]), t, class_labels=labels).sample.chunk(2)
            output = uncond + guidance_scale * (cond - uncond)
        else:
            output = unet(model_input, t, class_labels=labels).sample
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def teacher_sampler(
    pipeline,
    num_inference_steps: int = 20,
    scheduler: str = "dpmsolver++",
    *,
    guidance_scale: float = 1.0,
    null_class_label: Optional[int] = None,
) -> GeneratorFn:
    """The teacher's own multi-step sampler as a generator callable.

    Args:
        pipeline: a diffusers pipeline with a ``UNet2DModel`` ``unet`` and a scheduler (``DDPMPipeline``); its
            weights are not copied. An unconditional UNet samples through the stock ``DDPMPipeline``; a
            class-conditional one (``unet.config.num_class_embeds`` set; diffusers has no pipeline for it)
            through :func:`scheduler_loop`, the same loop with class labels.
        num_inference_steps: solver steps (each one UNet evaluation; two batched ones with guidance).
        scheduler: ``"dpmsolver++"`` (``DPMSolverMultistepScheduler``, 2nd order), ``"ddim"``
            (``DDIMScheduler``, eta = 0) or ``"ddpm"`` (the pipeline's own ancestral ``DDPMScheduler``);
            built with ``from_config`` of the teacher's scheduler, so prediction type, betas (zero terminal
            SNR included) and timestep spacing are the teacher's.
        guidance_scale: class-conditional only: > 1 is classifier-free guidance with ``null_class_label``
            (the class of dropped conditioning in training), 1 the plain conditional model.
        null_class_label: the unconditional class for guidance; required when ``guidance_scale > 1``.
    Returns:
        ``generate(batch_size, generator, class_labels=None) -> (batch_size, C, H, W) float32 in [-1, 1]``;
        ``class_labels`` ((batch_size,) int64, or a list of ints) is required for a class-conditional UNet
        and refused for an unconditional one.
    """
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler
    from diffusers.image_processor import VaeImageProcessor

    _check_unet_pipeline(pipeline)
    classes = {"dpmsolver++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if scheduler not in classes:
        raise ValueError(f"unknown sampler {scheduler!r}; choose one of {sorted(classes)}.")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}.")
    guidance_scale = float(guidance_scale)
    if not guidance_scale >= 1:
        raise ValueError(f"guidance_scale must be >= 1 (1: no guidance), got {guidance_scale}.")
    unet = pipeline.unet
    num_classes = _num_class_embeds(unet)
    if guidance_scale > 1:
        if num_classes is None:
            raise ValueError(
                "guidance needs a class-conditional UNet; this one is unconditional: use guidance_scale=1.")
        if null_class_label is None or not 0 <= int(null_class_label) < num_classes:
            raise ValueError(
                f"guidance_scale={guidance_scale:g} needs null_class_label, the class id in [0, {num_classes}) the "
                f"teacher was trained with for dropped conditioning; got {null_class_label!r}."
            )
    solver = classes[scheduler].from_config(pipeline.scheduler.config)
    if num_classes is None:
        sampler = DDPMPipeline(unet=unet, scheduler=solver)
        sampler.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def generate(batch_size: int, generator: torch.Generator, class_labels=None) -> torch.Tensor:
        labels = _checked_labels(class_labels, num_classes, batch_size, "UNet")
        if labels is None:
            images = sampler(
                batch_size=batch_size, generator=generator, num_inference_steps=num_inference_steps, output_type="pt"
            ).images  # [0, 1]
        else:
            images = scheduler_loop(unet, solver, batch_size, generator, num_inference_steps, labels,
                                    guidance_scale=guidance_scale, null_class_label=null_class_label)
        return VaeImageProcessor.normalize(images)

    generate.description = f"{scheduler} {num_inference_steps} steps" + (
        f", guidance {guidance_scale:g}" if guidance_scale > 1 else "")
    return generate


def naive_one_step_teacher(pipeline, timestep: Optional[int] = None) -> GeneratorFn:
    """The teacher used naively in one step: pure noise at the top timestep, read the clean-sample estimate.

    x0 = (x_T - sqrt(1 - a_T) eps) / sqrt(a_T) (epsilon), sqrt(a_T) x_T - sqrt(1 - a_T) v (v-prediction),
    or the output itself (sample), with a_T = alphas_cumprod[timestep] -- the one-step pipeline's own
    conversion (``noise_level`` / ``prediction_to_sample`` of ``pipeline_fd_onestep``). With zero-terminal-SNR
    betas a_T = 0 at T and the v-prediction estimate is exactly -v.

    Args:
        pipeline: a diffusers pipeline with a ``UNet2DModel`` ``unet`` (unconditional or class-conditional) and
            a DDPM-style scheduler (``alphas_cumprod``).
        timestep: default the last training timestep (num_train_timesteps - 1).
    Returns:
        ``generate(batch_size, generator, class_labels=None) -> (batch_size, C, H, W) float32``, *not* clamped
        (the comparison clamps to [-1, 1] as saving images would, and reports the clamped fraction);
        ``class_labels`` (batch_size,) int64 goes to the UNet as ``class_labels=``: required for a
        class-conditional UNet, refused for an unconditional one.
    """
    from ..pipelines.pipeline_fd_onestep import noise_level, prediction_to_sample

    _check_unet_pipeline(pipeline)
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
    num_classes = _num_class_embeds(unet)

    @torch.no_grad()
    def generate(batch_size: int, generator: torch.Generator, class_labels=None) -> torch.Tensor:
        device = unet.device
        labels = _checked_labels(class_labels, num_classes, batch_size, "UNet")
        labels = None if labels is None else labels.to(device)
        x_t = torch.randn(_image_shape(unet, batch_size), generator=generator, device=generator.device).to(
            device, unet.dtype
        )
        out = unet(x_t, torch.full((batch_size,), t, device=device), class_labels=labels).sample.float()
        return prediction_to_sample(out, x_t.float(), prediction_type, level)

    generate.description = f"1 step (x0 estimate at t={t})"
    return generate


def one_step_pipeline(pipeline) -> GeneratorFn:
    """A trained unconditional or class-conditional ``FDOneStepPipeline`` (e.g.
    ``FDOneStepPipeline.from_pretrained(output_dir)``) as a generator callable: one denoiser forward per batch
    (two batched with the pipeline's guidance), with the pipeline's own noise draw and output bound.

    Returns:
        ``generate(batch_size, generator, class_labels=None) -> (batch_size, C, H, W) float32`` in [-1, 1];
        a class-conditional pipeline needs ``class_labels`` ((batch_size,) int64, one per image), called as
        ``pipeline(class_labels=..., generator=generator, output_type="pt")``. Text-conditional pipelines are
        refused (the comparison has no prompts to give them).
    """
    from diffusers.image_processor import VaeImageProcessor

    if getattr(pipeline, "is_text_conditional", False):
        raise ValueError(
            "one_step_pipeline takes an unconditional or class-conditional FDOneStepPipeline; wrap a "
            "text-conditional one in your own generate(batch_size, generator) that picks the prompts."
        )
    num_classes = pipeline.num_classes if getattr(pipeline, "is_class_conditional", False) else None

    @torch.no_grad()
    def generate(batch_size: int, generator: torch.Generator, class_labels=None) -> torch.Tensor:
        labels = _checked_labels(class_labels, num_classes, batch_size, "FDOneStepPipeline")
        if labels is None:
            images = pipeline(batch_size=batch_size, generator=generator, output_type="pt").images  # [0, 1]
        else:
            images = pipeline(class_labels=labels.tolist(), generator=generator, output_type="pt").images
        return VaeImageProcessor.normalize(images)

    generate.description = "1 step"
    return generate


def prompted_pipeline(
    pipeline,
    prompts_for: Callable[[torch.Tensor, torch.Generator], list],
    *,
    description: str,
    **call_kwargs,
) -> GeneratorFn:
    """A text-to-image pipeline (stock ``StableDiffusionPipeline`` & co., or a text ``FDOneStepPipeline``) as a
    class-conditional generator: the requested classes become prompts.

    Args:
        pipeline: called as ``pipeline(prompts, generator=generator, output_type="pt", **call_kwargs)``,
            returning images in [0, 1] (diffusers' convention).
        prompts_for: ``(labels (B,) int64, generator) -> B prompts`` naming each label, e.g.
            ``lambda labels, g: fd_onestep.demos.digits.digit_prompts(labels, HELD_OUT_PHRASINGS, g)``; it draws from
            ``generator`` before the pipeline does (the same for every generator given the same seed).
        description: how it samples (e.g. "dpmsolver++ 20 steps").
        call_kwargs: e.g. ``num_inference_steps=20`` for a multi-step pipeline.
    Returns:
        ``generate(batch_size, generator, class_labels) -> (batch_size, C, H, W) float32`` in [-1, 1].
    """
    from diffusers.image_processor import VaeImageProcessor

    @torch.no_grad()
    def generate(batch_size: int, generator: torch.Generator, class_labels=None) -> torch.Tensor:
        if class_labels is None:
            raise ValueError("a prompted pipeline needs class_labels: the classes its prompts name, one per image.")
        labels = torch.as_tensor(class_labels).to("cpu", torch.int64)
        prompts = list(prompts_for(labels, generator))
        if len(prompts) != batch_size:
            raise ValueError(f"prompts_for returned {len(prompts)} prompts for {batch_size} labels; return one per label.")
        images = pipeline(prompts, generator=generator, output_type="pt", **call_kwargs).images  # [0, 1]
        return VaeImageProcessor.normalize(torch.as_tensor(images).float())

    generate.description = description
    return generate
