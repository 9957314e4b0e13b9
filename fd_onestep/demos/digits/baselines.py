"""The bundled digits teacher's baselines (what ``python -m fd_onestep.demos.digits`` measures).

The naive one-step teacher, its multi-step sampler(s) and any trained one-step students, in every bundled
digits representation (training and held out), with the digit classifier's class histogram.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from ...comparison.generators import naive_one_step_teacher, one_step_pipeline, prompted_pipeline, teacher_sampler
from ...comparison.measure import compare_generators, seed_spread

__all__ = ["digits_generators", "digits_teacher_baselines", "digits_text_generators", "load_digits_text_teachers"]


def digits_generators(
    *,
    sampler: str = "dpmsolver++",
    num_inference_steps: int = 20,
    extra_samplers: Iterable[tuple[str, int]] = (),
    students: Mapping[str, object] = {},
    device=None,
) -> dict:
    """The bundled digits teacher used naively in one step and with its multi-step sampler(s), plus any trained
    one-step students (display name -> output folder of ``train_fd_onestep.py``, loaded with
    ``FDOneStepPipeline.from_pretrained``), as generator callables for :func:`compare_generators`."""
    from . import load_digits_teacher

    teacher = load_digits_teacher(device)
    generators = {
        "teacher, 1 step (naive)": naive_one_step_teacher(teacher),
        f"teacher, {sampler} {num_inference_steps} steps": teacher_sampler(teacher, num_inference_steps, sampler),
    }
    for name, steps in extra_samplers:
        generators[f"teacher, {name} {steps} steps"] = teacher_sampler(teacher, steps, name)
    if students:
        from ...pipelines.pipeline_fd_onestep import FDOneStepPipeline

        for name, folder in students.items():
            pipe = FDOneStepPipeline.from_pretrained(str(folder), local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            generators[name] = one_step_pipeline(pipe.to(device) if device is not None else pipe)
    return generators


def digits_teacher_baselines(
    output_dir=None,
    *,
    num_samples: int = 2000,
    sampler: str = "dpmsolver++",
    num_inference_steps: int = 20,
    extra_samplers: Iterable[tuple[str, int]] = (),
    students: Mapping[str, object] = {},
    seed: int = 0,
    spread_seeds: Iterable[int] = (),
    device=None,
) -> dict:
    """Compare the bundled digits teacher used naively in one step with its multi-step sampler (and any trained
    ``students``, see :func:`digits_generators`), in every bundled representation (training and held out), with
    the digit classifier's class histogram.

    These are the targets of the offline default: the student's held-out FD should be <= 1.5x the multi-step
    teacher's and >= 10x below the naive one-step teacher's. With ``spread_seeds`` (two or more), the FDs are
    also repeated over those seeds and ``seed_spread.md`` / ``.json`` written (:func:`seed_spread`).
    """
    from . import (
        HELD_OUT_ENCODERS,
        TRAINING_ENCODERS,
        load_bundled_encoders,
        load_bundled_references,
        load_digit_classifier,
    )

    generators = digits_generators(sampler=sampler, num_inference_steps=num_inference_steps,
                                   extra_samplers=extra_samplers, students=students, device=device)
    names = TRAINING_ENCODERS + HELD_OUT_ENCODERS
    encoders = load_bundled_encoders(names, device=device)
    references = load_bundled_references(names)
    report = compare_generators(
        generators,
        encoders,
        references,
        num_samples=num_samples,
        output_dir=output_dir,
        held_out=set(HELD_OUT_ENCODERS),
        classifier=load_digit_classifier(device=device),
        seed=seed,
    )
    spread_seeds = list(spread_seeds)
    if spread_seeds:
        seed_spread(generators, encoders, references, seeds=spread_seeds, num_samples=num_samples,
                    output_dir=output_dir, held_out=set(HELD_OUT_ENCODERS), known_reports=[report])
    return report


def load_digits_text_teachers(*, sampler: str = "dpmsolver++", guidance_scale: float = 1.0, device=None) -> tuple:
    """The bundled text-conditional digits teacher (``TEXT_TEACHER_PATH``) as ``(multi-step, naive one-step)``
    pipelines: the stock ``StableDiffusionPipeline`` with ``sampler`` built ``from_config`` of its scheduler, and
    ``FDOneStepPipeline.from_teacher`` (x0 at the top timestep)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    from . import TEXT_TEACHER_PATH
    from ...pipelines.pipeline_fd_onestep import FDOneStepPipeline

    teacher = StableDiffusionPipeline.from_pretrained(TEXT_TEACHER_PATH, local_files_only=True)
    classes = {"dpmsolver++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    teacher.scheduler = classes[sampler].from_config(teacher.scheduler.config)
    naive = FDOneStepPipeline.from_teacher(TEXT_TEACHER_PATH, local_files_only=True, guidance_scale=guidance_scale)
    for pipe in (teacher, naive):
        pipe.set_progress_bar_config(disable=True)
        if device is not None:
            pipe.to(device)
    return teacher, naive


def digits_text_generators(phrasings, *, sampler: str = "dpmsolver++", num_inference_steps: int = 20,
                           guidance_scale: float = 1.0, device=None, teachers: tuple | None = None) -> dict:
    """The bundled text-conditional digits teacher as class-conditional generators whose prompts name the
    requested digit in one of ``phrasings`` (drawn per image): used naively in one step and with its multi-step
    sampler. ``teachers``: the pipelines of :func:`load_digits_text_teachers` (with this ``sampler`` and
    ``guidance_scale``), so that several phrasing sets share one load; loaded here if None."""
    from . import digit_prompts

    def prompts_for(labels, generator):
        return digit_prompts(labels, phrasings, generator)

    teacher, naive = teachers if teachers is not None else load_digits_text_teachers(
        sampler=sampler, guidance_scale=guidance_scale, device=device)
    return {
        "teacher, 1 step (naive)": prompted_pipeline(naive, prompts_for, description="1 step (x0 at the top timestep)"),
        f"teacher, {sampler} {num_inference_steps} steps": prompted_pipeline(
            teacher, prompts_for, description=f"{sampler} {num_inference_steps} steps",
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale),
    }
