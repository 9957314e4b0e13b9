"""The digits demo's training recipes: what ``train_fd_onestep.py --embedded_default NAME`` sets.

A recipe is the teacher, the encoders and statistics, and every setting that differs from the training script's
own defaults. It overrides only the arguments the user did not pass. Why each value was chosen, and what it
measures, is in docs/digits.md, docs/digits_class.md and docs/digits_text.md; the runs are in results/.
"""

from __future__ import annotations

from . import (
    CLASS_TEACHER_PATH,
    HELD_OUT_ENCODERS,
    NULL_CLASS_LABEL,
    TEACHER_PATH,
    TEXT_TEACHER_PATH,
    TRAINING_ENCODERS,
    encoder_spec,
    stats_path,
)

__all__ = ["RECIPES", "TEXT_LORA_TARGETS"]

# the text teacher's LoRA: the attention projections and the resnet convolutions
TEXT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def _bundled(teacher) -> dict:
    """The bundled teacher, the training encoders with their statistics and the held-out encoders with theirs."""
    return {
        "pretrained_model_name_or_path": str(teacher),
        "encoders": [encoder_spec(name) for name in TRAINING_ENCODERS],
        "reference_stats": [str(stats_path(name)) for name in TRAINING_ENCODERS],
        "eval_encoders": [encoder_spec(name) for name in HELD_OUT_ENCODERS],
        "eval_reference_stats": [str(stats_path(name)) for name in HELD_OUT_ENCODERS],
    }


# unconditional: the README's main job
_DIGITS = {
    **_bundled(TEACHER_PATH),
    "train_batch_size": 64,
    "max_train_steps": 1000,
    "learning_rate": 1e-4,
    "lr_warmup_steps": 50,
    "fd_ema_beta": 0.8,
    "fd_warmup_samples": 2048,
    "fd_queue_size": 2048,
    "checkpointing_steps": 250,
    "validation_steps": 200,
    "num_validation_images": 40,
    "keep_best_by": "fd_r_mean",  # training encoders only: the held-out ones stay an honest measure
    "final_weights": "best",
    "onestep_timestep": 600,
    "output_bound": "clamp",
    "channels_last": True,
    "adam_fused": True,
    "compare_with_teacher": True,
    "num_output_samples": 1000,
    "encoder_loss_weights": [1.0, 1.0, 2.0],  # dinov2-digits, siglip-digits, pixels-digits
}

# class-conditional: the joint FD-loss on the class teacher (digits 0-9 and its null class), adherence by the
# bundled digit classifier; AdamW's foreach kernel and validation every 100 steps, as its documented figures
_DIGITS_CLASS = {
    **_DIGITS,
    **_bundled(CLASS_TEACHER_PATH),
    "adam_fused": False,
    "validation_steps": 100,
    "null_class_label": NULL_CLASS_LABEL,
    "fd_condition": "joint",
    "classifier": "digits",
    "write_comparison_samples": True,
}

# text-to-image: a one-step LoRA (always) on the Stable Diffusion-family teacher, prompts naming the digit
_DIGITS_TEXT = {
    **_DIGITS_CLASS,
    **_bundled(TEXT_TEACHER_PATH),
    "null_class_label": None,
    "use_lora": True,
    "lora_rank": 16,
    "lora_target_modules": TEXT_LORA_TARGETS,
}

RECIPES = {"digits": _DIGITS, "digits-class": _DIGITS_CLASS, "digits-text": _DIGITS_TEXT}
