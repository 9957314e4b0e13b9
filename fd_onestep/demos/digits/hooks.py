"""The digits demo's hooks for ``train_fd_onestep.py``: what its configs (``configs/*.json``, key ``demo``) give the
generic trainer: the short names of its builtin encoders, the bundled classifier, the digits-text prompts, the real
images of the adversarial term, the model card's base-model line, and the end-of-run comparison."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate.logging import get_logger

from ... import comparison
from ...comparison.generators import prompted_pipeline
from ...training.generation import generate_images
from ...training.representations import Representations
from ...training.teacher_comparison import run_comparison as run_teacher_comparison
from . import (
    BUILTIN_ENCODERS,
    HELD_OUT_PHRASINGS,
    NUM_CLASSES,
    TRAINING_PHRASINGS,
    classifier_path,
    digit_prompt,
    digit_prompts,
    load_digit_classifier,
    load_digits_split,
)
from .baselines import digits_text_generators, load_digits_text_teachers

logger = get_logger(__name__, log_level="INFO")


class DigitsDemo:
    """The hooks of one digits demo (``text``: the digits-text one, whose prompts name the digit)."""

    def __init__(self, text: bool = False):
        self.text = text
        self.compares_latent = text  # the text teacher is a latent model with its own comparison
        self.encoder_aliases = {spec: name for name, spec in BUILTIN_ENCODERS.items()}

    def classifier_source(self, name: str) -> str | None:
        """``--classifier digits``: the bundled digit classifier's folder."""
        return str(classifier_path()) if name == "digits" else None

    def training_prompts(self):
        """digits-text: every training phrasing of every digit, with the digit it names; None for the others."""
        if not self.text:
            return None
        pairs = [(digit_prompt(c, phrasing), c) for c in range(NUM_CLASSES) for phrasing in TRAINING_PHRASINGS]
        return [p for p, _ in pairs], [c for _, c in pairs]

    def comparison_prompts(self) -> list[str] | None:
        """digits-text: every prompt the comparison may ask for (each digit in every training and held-out phrasing),
        stored with the training prompts in the prompt store; None for the others."""
        if not self.text:
            return None
        return [digit_prompt(c, phrasing) for c in range(NUM_CLASSES)
                for phrasing in (*TRAINING_PHRASINGS, *HELD_OUT_PHRASINGS)]

    def real_images(self, max_images: int) -> torch.Tensor:
        """The adversarial term's real images: the digits train split."""
        return load_digits_split("train")[0][:max_images]

    def model_card_base(self, args, pipe) -> str | None:
        """The card's base model of a full fine-tune: the bundled teacher by its folder (a LoRA keeps its path)."""
        if args.use_lora:
            return None
        return (f"fd_onestep bundled {'class-conditional ' if pipe.is_class_conditional else ''}digits teacher "
                f"(fd_onestep/demos/digits/assets/{Path(args.pretrained_model_name_or_path).name})")

    def run_comparison(self, args, accelerator, gen, model, reps: Representations):
        """The end-of-run comparison: the text one, or the teacher's with the digit classifier's class histogram."""
        if self.text:
            return run_text_comparison(args, accelerator, gen, model, reps)
        return run_teacher_comparison(args, accelerator, gen, model, reps,
                                      classifier=None if reps.classifier_model is not None else load_digit_classifier(device=accelerator.device),
                                      classifier_name="digits")


DIGITS = DigitsDemo()
DIGITS_CLASS = DigitsDemo()
DIGITS_TEXT = DigitsDemo(text=True)


def run_text_comparison(args, accelerator, gen, model, reps: Representations):
    """The digits-text default's comparison: the text teacher used naively in one step, its multi-step sampler
    (the stock ``StableDiffusionPipeline``) and the one-step LoRA student, every image asked for a digit by a
    prompt in a phrasing drawn per image: the training phrasings (``DIR/comparison.*``) and the held-out ones
    (``DIR/held_out_phrasings/comparison.*``). Returns the training phrasings' report."""
    from diffusers.image_processor import VaeImageProcessor  # diffusers' import is slow: only where it is used

    device = accelerator.device

    @torch.no_grad()
    def student(prompts, generator=None, output_type="pt"):  # the stock call the comparison makes
        cond = gen.encode_prompts(prompts, device=device)
        noise = gen.sample_noise(len(prompts), generator=generator, device=device)
        return SimpleNamespace(images=VaeImageProcessor.denormalize(generate_images(accelerator, gen, model, noise, cond)))

    classifier = reps.classifier_model or load_digit_classifier(device=device)
    teachers = load_digits_text_teachers(sampler=args.teacher_sampler, device=device)
    reports = {}
    for tag, phrasings, out in (("training", TRAINING_PHRASINGS, Path(args.output_dir)),
                                ("held out", HELD_OUT_PHRASINGS, Path(args.output_dir) / "held_out_phrasings")):
        def prompts_for(labels, generator, phrasings=phrasings):
            return digit_prompts(labels, phrasings, generator)

        generators = digits_text_generators(phrasings, sampler=args.teacher_sampler,
                                            num_inference_steps=args.teacher_num_inference_steps, teachers=teachers)
        naive, multistep = list(generators)
        generators["student, 1 step (FD-loss)"] = prompted_pipeline(student, prompts_for, description="1 step")
        folders = {naive: "teacher_naive", multistep: "teacher_multistep", "student, 1 step (FD-loss)": "student"}
        logger.info(f"Comparing on the {tag} phrasings")
        reports[tag] = comparison.compare_generators(
            generators, reps.all_encoders, reps.all_references, num_samples=args.num_comparison_samples,
            output_dir=out, held_out=set(reps.eval_encoders), classifier=classifier, batch_size=args.sample_batch_size,
            seed=args.seed, num_classes=gen.num_label_classes, class_references=reps.class_references,
            classifier_name=args.classifier or "digits", sample_folders=folders if args.write_comparison_samples else None,
        )
    return reports["training"]
