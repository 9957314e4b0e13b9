"""The digits demo's training recipes: what ``train_fd_onestep.py --embedded_default NAME`` (and ``--preset``) sets.

A recipe is a config file of this folder, ``configs/<name>.json`` (``presets/<name>.json`` for the presets on top
of one): the teacher, the encoders and statistics, and every setting that differs from the training script's own
defaults; ``train_fd_onestep.py --config FILE`` reads it (fd_onestep/training/config.py) and an argument given on
the command line wins. Why each value was chosen, and what it measures, is in docs/digits.md,
docs/digits_class.md, docs/digits_text.md and docs/quality.md; the runs are in results/.
"""

from __future__ import annotations

from pathlib import Path

from ...training.config import RESERVED_KEYS, load_config

__all__ = ["CONFIGS_DIR", "PRESETS_DIR", "RECIPES", "PRESETS", "TEXT_LORA_TARGETS"]

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def _arguments(path: Path) -> dict:
    return {k: v for k, v in load_config(path).items() if k not in RESERVED_KEYS}


# the embedded defaults: digits (unconditional, the README's main job), digits-class, digits-text
RECIPES = {path.stem: _arguments(path) for path in sorted(CONFIGS_DIR.glob("*.json"))}
# on top of one of them: quality (a longer cosine schedule with an EMA of the generator's weights, docs/quality.md)
PRESETS = {path.stem: _arguments(path) for path in sorted(PRESETS_DIR.glob("*.json"))}
# the text teacher's LoRA: the attention projections and the resnet convolutions
TEXT_LORA_TARGETS = RECIPES["digits-text"]["lora_target_modules"]
