"""The offline embedded default, CI-sized: with no model / encoders / stats arguments the script trains the
bundled digits teacher with the bundled encoders, and writes the pipeline, the samples, the teacher-vs-student
comparison grid and FD table (training and held-out representations); the training FD goes down.

The full-size run (the defaults, minutes on CPU) is the README's; here a few steps with small sample counts.
"""

import json
import re

import pytest
import torch
from train_fixtures import run_script

from fd_onestep.demos import digits
from fd_onestep.demos.digits.recipes import RECIPES, TEXT_LORA_TARGETS
from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

pytestmark = pytest.mark.slow


def _load_script():
    import importlib.util

    from train_fixtures import SCRIPT

    spec = importlib.util.spec_from_file_location("train_fd_onestep", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_embedded_default_arguments_point_at_the_bundled_assets(tmp_path):
    script = _load_script()
    args = script.parse_args(["--output_dir", str(tmp_path)])
    assert args.embedded_default == "digits"
    assert args.pretrained_model_name_or_path == str(digits.TEACHER_PATH)
    assert args.encoders == [digits.encoder_spec(n) for n in digits.TRAINING_ENCODERS]
    assert args.eval_encoders == [digits.encoder_spec(n) for n in digits.HELD_OUT_ENCODERS]
    assert args.reference_stats == [str(digits.stats_path(n)) for n in digits.TRAINING_ENCODERS]
    for key, value in RECIPES["digits"].items():
        assert getattr(args, key) == value, key
    # held-out encoders never select checkpoints
    assert args.keep_best_by not in args.eval_encoders and args.compare_with_teacher is True


def test_help_shows_the_real_value_of_every_default_a_recipe_can_override():
    """The general defaults live in add_argument, so --help prints them; a demo recipe changes only the arguments
    the command line leaves out (and the explicit ones win, see the cadence and LoRA tests)."""
    import re
    import subprocess
    import sys

    from train_fixtures import SCRIPT, SUBPROCESS_ENV

    text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True,
                          env=SUBPROCESS_ENV, cwd=SCRIPT.parents[1]).stdout
    text = re.sub(r"\s+", " ", text.split("show this help message and exit", 1)[1])  # the options, not usage
    parser = _load_script().build_parser()
    # None is the real default of these: the teacher's top timestep, no bound, no selection, weight 1 each, ...
    none_by_design = {"pretrained_model_name_or_path", "encoders", "reference_stats", "eval_reference_stats",
                      "onestep_timestep", "output_bound", "keep_best_by", "encoder_loss_weights", "null_class_label",
                      "classifier", "lora_target_modules"}
    for recipe in RECIPES.values():
        for key in recipe:
            default = parser.get_default(key)
            assert default is not None or key in none_by_design, f"--{key} defaults to None, filled in later"
            option = re.search(rf"--{key}\b.*?\(default: ([^)]*)\)", text)
            assert option and option.group(1) == str(default), f"--help does not show --{key}'s default {default!r}"


def test_main_job_steps_with_fused_adamw_and_the_conditional_defaults_keep_foreach(tmp_path):
    """The main job runs AdamW's fused kernel; digits-class / digits-text keep torch's default (their documented
    figures were trained with it), and so does a general run unless --adam_fused is given."""
    from accelerate import Accelerator

    script = _load_script()
    params = [torch.nn.Parameter(torch.zeros(3))]

    def optimizer_of(argv):
        args = script.parse_args(["--output_dir", str(tmp_path), *argv])
        return args, script.build_optimizer(args, params, Accelerator(cpu=True))[0]

    args, optimizer = optimizer_of([])
    assert args.adam_fused is True and optimizer.defaults["fused"] is True
    for default in ("digits-class", "digits-text"):
        args, optimizer = optimizer_of(["--embedded_default", default])
        assert args.adam_fused is False and not optimizer.defaults["fused"]
    _, optimizer = optimizer_of(["--no-adam_fused"])
    assert not optimizer.defaults["fused"]
    # not in the run fingerprint (the same update, another round-off), like the thread count
    from fd_onestep.training.run_args import NON_FINGERPRINT_ARGS

    assert "adam_fused" in NON_FINGERPRINT_ARGS


def test_main_job_validates_every_200_steps_and_the_conditional_defaults_every_100(tmp_path):
    """The main job's validations (1,000 fresh samples each) come every 200 steps and at the end; digits-class /
    digits-text keep 100, the cadence their documented figures were selected with; an explicit value wins."""
    script = _load_script()

    def cadence(*argv):
        return script.parse_args(["--output_dir", str(tmp_path), *argv]).validation_steps

    assert cadence() == 200
    assert cadence("--embedded_default", "digits-class") == 100
    assert cadence("--embedded_default", "digits-text") == 100
    assert cadence("--validation_steps", "100") == 100


def test_builtin_digits_representation_is_named_pixels_digits_only_in_the_offline_default():
    from types import SimpleNamespace

    script = _load_script()
    embedded = script.label_aliases(SimpleNamespace(demo="fd_onestep.demos.digits.hooks:DIGITS"))
    general = script.label_aliases(SimpleNamespace(demo=None))
    assert script.encoder_label("pixels-gray:16", embedded) == "pixels-digits"
    # a user's own run with the same spec is not labelled after the bundled digits assets
    assert script.encoder_label("pixels-gray:16", general) == "pixels-gray_16"
    assert script.encoder_label("pixels-gray:16") == "pixels-gray_16"


def _table_value(text: str):
    """A value as the argument table of docs/training.md writes it: a Python literal, or space-separated numbers."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return [float(x) for x in text.split()]


def test_docs_argument_table_shows_the_general_and_embedded_defaults():
    """Every argument a digits recipe sets has a row in docs/training.md ("All arguments", linked from the README)
    that reads `general` (embedded: `digits`) (digits-class: `class-conditional digits`) exactly as the parser's
    default and the recipes say."""
    import re
    from pathlib import Path

    from train_fixtures import SCRIPT

    script = _load_script()
    table = Path(SCRIPT).parents[1] / "docs" / "training.md"
    rows = {}
    for line in table.read_text().splitlines():
        match = re.match(r"^\| `(--[a-z0-9_]+)(?:, --no-[a-z0-9_]+)?` \| `([^`]*)`(?: \(embedded: `([^`]*)`\))?"
                         r"(?: \(digits-class: `([^`]*)`\))? \|", line)
        if match:
            rows[match.group(1)[2:]] = (match.group(2), match.group(3), match.group(4))
    parser = script.build_parser()
    bundled = {"pretrained_model_name_or_path", "encoders", "reference_stats", "eval_encoders", "eval_reference_stats"}
    for key in (set(RECIPES["digits"]) | set(RECIPES["digits-class"])) - bundled:
        assert key in rows, f"{table.name} argument table has no row for --{key}"
        general_text, embedded_text, class_text = rows[key]
        general = parser.get_default(key)
        embedded = RECIPES["digits"].get(key, general)
        class_embedded = RECIPES["digits-class"].get(key, embedded)
        if class_embedded != embedded:
            assert class_text is not None, f"--{key}: {table.name} does not show the digits-class default {class_embedded!r}"
            assert _table_value(class_text) == class_embedded, f"--{key}: {table.name} digits-class default {class_text!r}"
        else:
            assert class_text is None, f"--{key}: {table.name} shows a digits-class default equal to the digits one"
        assert _table_value(general_text) == general, f"--{key}: {table.name} general default {general_text!r}"
        if embedded != general:
            assert embedded_text is not None, f"--{key}: {table.name} does not show the embedded default {embedded!r}"
            assert _table_value(embedded_text) == embedded, f"--{key}: {table.name} embedded default {embedded_text!r}"
        else:
            assert embedded_text is None, f"--{key}: {table.name} shows an embedded default that equals the general one"


def test_embedded_default_trains_the_digits_teacher_and_compares_it(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "digits-onestep"
    proc = run_script([
        "--output_dir", str(out),
        "--max_train_steps", "6", "--train_batch_size", "32", "--learning_rate", "1e-4", "--lr_warmup_steps", "1",
        "--fd_ema_beta", "0.5", "--fd_warmup_samples", "64", "--sample_batch_size", "64",
        "--validation_steps", "3", "--num_validation_samples", "64", "--num_validation_images", "8",
        "--checkpointing_steps", "3", "--num_output_samples", "20", "--num_comparison_samples", "64",
        "--teacher_num_inference_steps", "2",
    ])
    # the README's main job names its config and prints every value the config set, one line each (nanoGPT's
    # configurator); the values the command line gave are not the config's
    logged = dict(re.findall(r"config digits\.json: --(\w+) = (.*)", proc.stdout + proc.stderr))
    # (--learning_rate 1e-4 above is the config's own value: the value in effect is still the config's)
    given = {"max_train_steps", "train_batch_size", "lr_warmup_steps", "fd_ema_beta",
             "fd_warmup_samples", "validation_steps", "num_validation_images", "checkpointing_steps",
             "num_output_samples"}
    assert {k: json.loads(v) for k, v in logged.items()} == {k: v for k, v in RECIPES["digits"].items() if k not in given}
    saved = json.loads((out / "fd_onestep_run_args.json").read_text())["args"]
    assert saved["config_values"] == {k: v for k, v in RECIPES["digits"].items() if k not in given}
    pipe = FDOneStepPipeline.from_pretrained(out)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 16, 16)
    assert len(list((out / "samples").glob("*.png"))) == 20
    assert (out / "comparison_grid.png").is_file() and (out / "comparison.md").is_file()
    report = json.loads((out / "comparison.json").read_text())
    assert len(report["generators"]) == 3
    for result in report["generators"].values():
        assert set(result["fd"]) == set(digits.TRAINING_ENCODERS) | set(digits.HELD_OUT_ENCODERS)
    assert {name for name, r in report["representations"].items() if r["held_out"]} == set(digits.HELD_OUT_ENCODERS)

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    for name in digits.TRAINING_ENCODERS:
        fds = [e.value for e in events.Scalars(f"fd/{name}")]
        assert fds[-1] < fds[0], f"training FD in {name} did not go down: {fds}"


# ------------------------------------------------------------------------------------ the class-conditional default
def test_class_conditional_default_points_at_the_class_teacher_and_its_per_class_statistics(tmp_path):
    script = _load_script()
    args = script.parse_args(["--embedded_default", "digits-class", "--output_dir", str(tmp_path)])
    assert args.embedded_default == "digits-class"
    assert args.pretrained_model_name_or_path == str(digits.CLASS_TEACHER_PATH)
    assert args.class_reference_stats == [str(digits.class_stats_path(n)) for n in digits.TRAINING_ENCODERS]
    assert args.eval_class_reference_stats == [str(digits.class_stats_path(n)) for n in digits.HELD_OUT_ENCODERS]
    for key, value in RECIPES["digits-class"].items():
        if key not in ("class_reference_stats", "eval_class_reference_stats"):
            assert getattr(args, key) == value, key
    assert args.null_class_label == digits.NULL_CLASS_LABEL
    # the choice of default is only for the bundled assets
    with pytest.raises(ValueError, match="--embedded_default digits-class runs the bundled digits assets"):
        script.parse_args(["--embedded_default", "digits-class", "--pretrained_model_name_or_path", "x",
                           "--output_dir", str(tmp_path)])


def run_demo(demo: str, out, **settings) -> None:
    """A CI-size run of ``--embedded_default demo`` into ``out``: 100-sample validations and batches, no
    checkpoints, a 2-step teacher sampler, and the given ``settings`` (argument name -> value)."""
    settings = {"sample_batch_size": 100, "num_validation_samples": 100, "num_validation_images": 10,
                "checkpointing_steps": 0, "teacher_num_inference_steps": 2, **settings}
    run_script(["--embedded_default", demo, "--output_dir", str(out),
                *[word for name, value in settings.items() for word in (f"--{name}", str(value))]])


def pngs_per_digit(root) -> list[int]:
    """How many PNGs each of ``root/0`` ... ``root/9`` holds (samples written per requested digit)."""
    return [len(list((root / str(c)).glob("*.png"))) for c in range(digits.NUM_CLASSES)]


def test_class_conditional_default_follows_its_labels_and_writes_samples_per_class(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "digits-class-onestep"
    run_demo("digits-class", out, max_train_steps=4, train_batch_size=32, learning_rate=1e-4, lr_warmup_steps=1,
             fd_ema_beta=0.5, fd_warmup_samples=64, validation_steps=2, num_output_samples=30, num_comparison_samples=40)
    pipe = FDOneStepPipeline.from_pretrained(out)
    assert pipe.num_classes == digits.NUM_CLASSES and pipe.config.null_class_label == digits.NULL_CLASS_LABEL
    # samples/<label>/: every requested digit equally often
    assert sorted(p.name for p in (out / "samples").iterdir()) == [str(c) for c in range(10)]
    assert pngs_per_digit(out / "samples") == [3] * 10
    for folder in ("teacher_naive", "teacher_multistep", "student"):
        root = out / "comparison_samples" / folder
        assert pngs_per_digit(root) == [4] * 10, folder
    report = json.loads((out / "comparison.json").read_text())
    assert report["num_classes"] == 10
    for name, result in report["generators"].items():
        assert 0.0 <= result["adherence"] <= 1.0, name
        assert set(result["conditioning"]) == set(digits.TRAINING_ENCODERS) | set(digits.HELD_OUT_ENCODERS)
    table = (out / "comparison.md").read_text()
    assert "adherence" in table and "FJD" in table

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"adherence", "per_class_fd/resnet-digits", "fjd/randcnn-digits", "fresh_fd/pixels-digits"} <= tags
    summary = json.loads((out / "fd_onestep_summary.json").read_text())
    assert 0.0 <= summary["final_validation"]["adherence"] <= 1.0


def test_class_conditional_exact_population_feeds_the_joint_loss_the_labels_in_both_passes(tmp_path):
    out = tmp_path / "exact-joint"
    run_script([
        "--embedded_default", "digits-class", "--output_dir", str(out), "--fd_population", "exact",
        "--fd_micro_batches", "2", "--max_train_steps", "2", "--train_batch_size", "16", "--sample_batch_size", "50",
        "--validation_steps", "0", "--num_validation_samples", "50", "--num_validation_images", "0",
        "--checkpointing_steps", "0", "--num_output_samples", "0", "--no-compare_with_teacher",
    ])
    # pass 2 saw pass 1's joint vectors (the step's end checks it bitwise on CPU), and the loss is joint
    summary = json.loads((out / "fd_onestep_summary.json").read_text())
    assert summary["global_step"] == 2 and (out / "model_index.json").is_file()
    validation = summary["final_validation"]["fds"]
    for name in digits.TRAINING_ENCODERS:
        assert "loss_fd" in validation[name] and validation[name]["loss_fd"] > 0


# ------------------------------------------------------------------------------------ the text-to-image default
def test_text_default_trains_a_one_step_lora_that_the_stock_pipeline_runs_and_compares_both_phrasings(tmp_path):
    import diffusers

    out = tmp_path / "digits-text-onestep"
    run_demo("digits-text", out, max_train_steps=3, train_batch_size=16, fd_warmup_samples=32, validation_steps=0,
             num_output_samples=20, num_comparison_samples=20, eval_clip_model=digits.CLIP_PATH)
    info = json.loads((out / "fd_onestep_lora.json").read_text())
    assert info["base_model"] == str(digits.TEXT_TEACHER_PATH) and (out / "pytorch_lora_weights.safetensors").is_file()
    assert pngs_per_digit(out / "samples") == [2] * 10
    for folder in (out, out / "held_out_phrasings"):  # training and held-out phrasings, each with all generators
        report = json.loads((folder / "comparison.json").read_text())
        assert report["num_classes"] == 10 and len(report["generators"]) == 3
        assert all(0 <= r["adherence"] <= 1 for r in report["generators"].values())
        assert pngs_per_digit(folder / "comparison_samples" / "student") == [2] * 10
    summary = json.loads((out / "fd_onestep_summary.json").read_text())
    assert 0 <= summary["final_validation"]["adherence"] <= 1  # the label of each drawn prompt is known
    clip = summary["final_validation"]["clip_score"]  # --eval_clip_model: the bundled digits CLIP on fresh samples
    assert clip["model"] == str(digits.CLIP_PATH) and clip["num_samples"] == 100 and 0 <= clip["score"] <= 100
    # the stock StableDiffusionPipeline with the LoRA and the recipe takes the student's one step
    recipe = info["stock_pipeline"]
    stock = diffusers.StableDiffusionPipeline.from_pretrained(info["base_model"], local_files_only=True)
    stock.load_lora_weights(out)
    stock.scheduler = getattr(diffusers, recipe["scheduler"]).from_config(stock.scheduler.config,
                                                                         **recipe["scheduler_overrides"])
    stock.set_progress_bar_config(disable=True)
    student = FDOneStepPipeline.from_teacher(info["base_model"], local_files_only=True, **info["one_step_settings"])
    student.load_lora_weights(out)
    prompts = ["the digit seven", "a handwritten digit two"]
    ours = student(prompts, generator=torch.Generator().manual_seed(0), output_type="pt").images
    theirs = stock(prompts, generator=torch.Generator().manual_seed(0), output_type="pt", **recipe["call_kwargs"]).images
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)


def test_text_default_always_trains_its_lora_with_conv_targets_unless_told_otherwise(tmp_path):
    script = _load_script()
    args = script.parse_args(["--embedded_default", "digits-text", "--output_dir", str(tmp_path)])
    assert args.use_lora and args.pretrained_model_name_or_path == str(digits.TEXT_TEACHER_PATH)
    assert args.lora_rank == 16 and args.lora_target_modules == TEXT_LORA_TARGETS
    given = script.parse_args(["--embedded_default", "digits-text", "--lora_rank", "4", "--lora_target_modules",
                               "to_q", "--output_dir", str(tmp_path)])
    assert given.lora_rank == 4 and given.lora_target_modules == ["to_q"]
    assert script.parse_args(["--output_dir", str(tmp_path)]).lora_rank == 8
