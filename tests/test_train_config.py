"""A recipe is a config file: its values become the parser's defaults (explicit flags win), the run says which
values it set, and the trainer reaches the digits demo only through its config."""

import json
import re
from argparse import Namespace
from pathlib import Path

import pytest

from fd_onestep.demos import digits
from fd_onestep.demos.digits.recipes import PRESETS, RECIPES
from fd_onestep.training.config import bundled_config_path, config_report

ROOT = Path(__file__).resolve().parents[1]


def test_the_no_argument_command_names_its_config_and_help_says_how_to_see_it(script, tmp_path):
    args = script.parse_args(["--output_dir", str(tmp_path)])
    assert args.config == [str(bundled_config_path("digits"))] and args.embedded_default == "digits"
    assert args.config_values == RECIPES["digits"]
    help_text = re.sub(r"\s+", " ", script.build_parser().format_help())
    assert "bundled config 'digits'" in help_text and "--show_config" in help_text


def test_a_users_config_file_sets_defaults_that_flags_override(script, tmp_path):
    config = tmp_path / "mine.json"
    config.write_text(json.dumps({"extends": str(bundled_config_path("digits")), "learning_rate": 5e-5,
                                  "max_train_steps": 77, "prompts_file": None}))
    args = script.parse_args(["--config", str(config), "--output_dir", str(tmp_path / "o"), "--max_train_steps", "9"])
    assert args.learning_rate == 5e-5 and args.max_train_steps == 9  # the flag wins over the file
    assert args.config_values["learning_rate"] == 5e-5 and "max_train_steps" not in args.config_values
    assert args.pretrained_model_name_or_path == str(digits.TEACHER_PATH) and args.embedded_default is None
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rat": 1.0}))
    with pytest.raises(ValueError, match="--learning_rat.*which train_fd_onestep.py does not have"):
        script.parse_args(["--config", str(tmp_path / "bad.json"), "--output_dir", str(tmp_path / "o")])


def test_an_embedded_default_takes_other_encoders_with_their_statistics(script, tmp_path):
    """Recipe settings are overridable, the encoders included: the config's statistics and loss weights belong to
    its encoders and give way to the command line's."""
    args = script.parse_args(["--embedded_default", "digits-text", "--output_dir", str(tmp_path),
                              "--encoders", digits.encoder_spec("dinov2-digits"),
                              "--reference_stats", str(digits.stats_path("dinov2-digits"))])
    assert args.encoders == [digits.encoder_spec("dinov2-digits")]
    assert args.reference_stats == [str(digits.stats_path("dinov2-digits"))] and args.encoder_loss_weights == [1.0]
    assert args.use_lora and args.lora_rank == 16 and args.pretrained_model_name_or_path == str(digits.TEXT_TEACHER_PATH)
    assert "encoders" not in args.config_values and "encoder_loss_weights" not in args.config_values
    with pytest.raises(ValueError, match="--reference_stats has 3 files for 1 encoders|missing: --reference_stats"):
        script.parse_args(["--embedded_default", "digits-text", "--output_dir", str(tmp_path),
                           "--encoders", digits.encoder_spec("dinov2-digits")])


def test_a_warm_up_longer_than_the_run_is_warned_about(script, tmp_path):
    args = script.parse_args(["--output_dir", str(tmp_path), "--preset", "quality", "--max_train_steps", "50"])
    assert args.lr_warmup_steps == PRESETS["quality"]["lr_warmup_steps"] == 100
    lines, warnings = config_report(args)
    assert "config digits.json, quality.json: --lr_warmup_steps = 100" in lines
    assert len(warnings) == 1 and "the config's learning-rate warm-up (--lr_warmup_steps 100)" in warnings[0]
    assert "--max_train_steps 50" in warnings[0]
    assert config_report(Namespace(lr_warmup_steps=10, max_train_steps=50, config_values={}, config=None))[1] == []


def test_show_config_prints_every_value_and_exits_without_a_model(script, tmp_path, capsys):
    args = script.parse_args(["--embedded_default", "digits-class", "--show_config", "--output_dir", str(tmp_path)])
    assert script.main(args) == RECIPES["digits-class"]
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(RECIPES["digits-class"]) and all(line.startswith("config digits-class.json: --") for line in out)
    assert not (tmp_path / "fd_onestep_run_args.json").exists()


def test_the_trainer_names_no_demo():
    source = (ROOT / "train_scripts" / "train_fd_onestep.py").read_text()
    assert not re.search(r"demos.digits|embedded_default ==", source)
    assert len(source.splitlines()) <= 1200
    import ast

    main = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 150
