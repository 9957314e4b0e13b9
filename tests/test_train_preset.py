"""``--preset quality``: a named recipe on top of a digits default that fills only the arguments the command line
leaves out (the recipe under study in benchmarks/quality_study.py, docs/quality.md)."""

import pytest
from train_fixtures import build_all, encoder_args

from fd_onestep.demos.digits.recipes import PRESETS, RECIPES


def test_the_quality_preset_sets_its_recipe_on_the_digits_default(script, tmp_path):
    args = script.parse_args(["--output_dir", str(tmp_path), "--preset", "quality"])
    assert args.embedded_default == "digits"
    for key, value in PRESETS["quality"].items():
        assert getattr(args, key) == value, key
    # what the preset leaves alone is the digits default's
    assert args.learning_rate == RECIPES["digits"]["learning_rate"]
    assert args.onestep_timestep == RECIPES["digits"]["onestep_timestep"]
    plain = script.parse_args(["--output_dir", str(tmp_path)])
    assert plain.max_train_steps == RECIPES["digits"]["max_train_steps"] and not plain.use_ema


@pytest.mark.parametrize("default", ["digits-class", "digits-text"])
def test_the_quality_preset_combines_with_the_conditional_defaults(script, tmp_path, default):
    args = script.parse_args(["--output_dir", str(tmp_path), "--embedded_default", default, "--preset", "quality"])
    assert args.max_train_steps == 3000 and args.use_ema and args.ema_decay == 0.998
    assert args.fd_condition == "joint" and args.classifier == "digits"  # the conditional recipe underneath
    assert args.use_lora == (default == "digits-text")


def test_arguments_given_on_the_command_line_win_over_the_preset(script, tmp_path):
    args = script.parse_args(["--output_dir", str(tmp_path), "--preset", "quality", "--max_train_steps", "10",
                              "--ema_decay", "0.9", "--validation_steps", "5", "--checkpointing_steps", "5"])
    assert (args.max_train_steps, args.ema_decay, args.validation_steps, args.checkpointing_steps) == (10, 0.9, 5, 5)
    assert args.use_ema and args.lr_warmup_steps == 100


def test_the_preset_on_a_users_model_is_an_early_error(script, tmp_path_factory, tmp_path):
    assets = build_all(tmp_path_factory.getbasetemp() / "train_assets")
    with pytest.raises(ValueError, match="--preset quality is a recipe of the offline digits defaults"):
        script.parse_args(["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets),
                           "--output_dir", str(tmp_path), "--preset", "quality"])
