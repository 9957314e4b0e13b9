"""The end-of-run comparison of a pixel teacher: the teacher used naively in one step, the teacher with its
multi-step sampler, and the student (grid and FD tables through :func:`fd_onestep.comparison.compare_generators`)."""

from __future__ import annotations

from pathlib import Path

import torch

from fd_onestep.training.generation import generate_images
from fd_onestep.training.inputs import teacher_load_kwargs
from fd_onestep.training.representations import Representations



def run_comparison(args, accelerator, gen, model, reps: Representations, classifier=None,
                   classifier_name: str | None = None):
    """Teacher used naively in one step, teacher with its multi-step sampler, and the student: side-by-side grid
    (``comparison_grid.png``) and FD table (``comparison.md`` / ``comparison.json``) in every training and
    held-out representation, through :func:`fd_onestep.comparison.compare_generators`.

    Class-conditional: every generator gets the same balanced labels; the tables add adherence (``--classifier``,
    else ``classifier``: a demo's, named ``classifier_name``), per-class FD and FJD; the grid has one row per class.
    ``--write_comparison_samples``: every generator's samples under ``comparison_samples/<generator>/[<label>/]``.
    """
    from diffusers import DiffusionPipeline

    from fd_onestep import comparison

    device = accelerator.device
    teacher = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **teacher_load_kwargs(args)).to(device)
    teacher.set_progress_bar_config(disable=True)
    conditional = gen.is_class_conditional

    @torch.no_grad()
    def student(batch_size: int, generator: torch.Generator, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        noise = gen.sample_noise(batch_size, generator=generator, device=device)
        if class_labels is not None:  # the comparison's labels (the noise stream stays the teacher's)
            cond = gen.conditioning_for_labels(class_labels, device=device)
        else:
            cond = gen.sample_conditioning(batch_size, generator=generator, device=device)
        return generate_images(accelerator, gen, model, noise, cond)

    naive = "teacher, 1 step (naive)"
    multistep = f"teacher, {args.teacher_sampler} {args.teacher_num_inference_steps} steps"
    generators = {
        naive: comparison.naive_one_step_teacher(teacher),
        multistep: comparison.teacher_sampler(teacher, args.teacher_num_inference_steps, args.teacher_sampler,
                                              null_class_label=gen.pipeline.config.null_class_label),
        "student, 1 step (FD-loss)": student,
    }
    folders = {naive: "teacher_naive", multistep: "teacher_multistep", "student, 1 step (FD-loss)": "student"}
    classifier = reps.classifier_model or classifier
    return comparison.compare_generators(
        generators,
        reps.all_encoders,
        reps.all_references,
        num_samples=args.num_comparison_samples,
        output_dir=Path(args.output_dir),
        held_out=set(reps.eval_encoders),
        classifier=classifier,
        batch_size=args.sample_batch_size,
        seed=args.seed,
        num_classes=gen.num_classes if conditional else None,
        class_references=reps.class_references if conditional else None,
        classifier_name=(args.classifier or classifier_name) if conditional and classifier is not None else None,
        sample_folders=folders if args.write_comparison_samples else None,
    )
