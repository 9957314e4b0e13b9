"""Specification of ``train_scripts/train_fd_onestep.py``, run end to end on CPU with tiny models.

Every supported family (pixel UNet, DiT, Stable Diffusion UNet, the SD3 flow family), every population mode
(ema / queue / exact), LoRA on and off: the script trains a few steps and its output loads with
``FDOneStepPipeline.from_pretrained`` (LoRA: ``load_lora_weights``) and generates.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import FAST_ARGS, encoder_args, run_script

from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

pytestmark = pytest.mark.slow


def _weights(folder: Path, slot: str) -> dict:
    return load_file(str(next((folder / slot).glob("*.safetensors"))))


def _generate(pipe, n=2, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images


# ------------------------------------------------------------------------------- pixel UNet, full fine-tune
@pytest.fixture(scope="module")
def unet_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("unet_run") / "out"
    proc = run_script([
        "--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets),
        "--eval_encoders", assets["encoders"]["siglip_eval"], "--eval_reference_stats", assets["stats"]["siglip_eval"],
        "--output_dir", str(out), *FAST_ARGS,
        "--fd_population", "ema", "--fd_ema_beta", "0.9", "--use_ema", "--ema_decay", "0.5",
        "--validation_steps", "1", "--keep_best_by", "fd_r_mean", "--final_weights", "last",
        "--checkpointing_steps", "1", "--checkpoints_total_limit", "1", "--report_to", "tensorboard",
        "--num_output_samples", "6", "--hub_token", "hf_NEVER_LOGGED_12345",
    ])
    return out, proc


def test_pixel_unet_full_finetune_saves_a_pipeline_that_loads_and_generates(unet_run, assets):
    out, _ = unet_run
    pipe = FDOneStepPipeline.from_pretrained(out)
    images = _generate(pipe, batch_size=3)
    assert images.shape == (3, 1, 16, 16) and torch.isfinite(images).all()
    assert pipe.config.output_bound is None and pipe.family == "unet2d"
    trained, teacher = _weights(out, "unet"), _weights(Path(assets["teachers"]["unet2d"]), "unet")
    assert any(not torch.equal(trained[k], teacher[k]) for k in teacher), "training changed no weight"


def test_run_logs_per_encoder_fd_loss_lr_and_grad_norm_to_tensorboard(unet_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = unet_run
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("weighted_fd", "objective", "lr", "grad_norm", "fd/tiny-dinov2", "fd/tiny-siglip",
                "fresh_fd/tiny-dinov2", "fresh_fd/tiny-siglip-eval", "fd_r/tiny-siglip",
                "fresh_over_population/tiny-dinov2"):
        assert tag in tags, f"{tag} not logged (got {sorted(tags)})"
    assert [e.step for e in events.Scalars("weighted_fd")] == [1, 2]
    assert "validation" in events.Tags()["images"]


def test_logged_weighted_fd_is_the_weighted_sum_of_the_population_fds(unet_run):
    """`weighted_fd` = sum_i w_i F_i (here every w_i = 1) tells how far the population is from the reference;
    the normalized objective sum_i w_i F_i / sg(F_i) is logged beside it and always equals sum_i w_i."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = unet_run
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalar = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in
              ("weighted_fd", "objective", "fd/tiny-dinov2", "fd/tiny-siglip")}
    for step in (1, 2):
        fds = scalar["fd/tiny-dinov2"][step] + scalar["fd/tiny-siglip"][step]
        assert scalar["weighted_fd"][step] == pytest.approx(fds, rel=1e-5)
        assert scalar["objective"][step] == pytest.approx(2.0, rel=1e-5)


def test_validation_reports_fresh_sample_fd_in_training_and_eval_encoders(unet_run):
    out, _ = unet_run
    summary = json.loads((out / "fd_onestep_summary.json").read_text())
    fds = summary["final_validation"]["fds"]
    assert set(fds) == {"tiny-dinov2", "tiny-siglip", "tiny-siglip-eval"}
    assert fds["tiny-siglip-eval"]["in_loss"] is False and fds["tiny-dinov2"]["in_loss"] is True
    assert all(r["fresh_fd"] > 0 and r["fd_r"] > 0 for r in fds.values())
    assert fds["tiny-dinov2"]["population_fd"] > 0
    assert (out / "validation" / "grid_000001.png").is_file() and (out / "validation_grid.png").is_file()


def test_best_pipeline_by_fresh_fd_is_kept(unet_run):
    out, _ = unet_run
    best = json.loads((out / "best" / "fd_onestep_best.json").read_text())
    assert best["keep_best_by"] == "fd_r_mean" and best["step"] in (1, 2)
    assert FDOneStepPipeline.from_pretrained(out / "best").family == "unet2d"


def test_checkpoints_are_pruned_to_the_limit_and_written_completely(unet_run):
    out, _ = unet_run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    ckpt = out / "checkpoint-2"
    for name in ("fd_onestep_checkpoint.json", "fd_onestep_run_args.json", "fd_populations.safetensors",
                 "generator_ema.safetensors", "training_state.safetensors", "optimizer.bin", "unet/config.json"):
        assert (ckpt / name).exists(), name
    assert not list(out.glob(".checkpoint-*"))
    assert not list(ckpt.glob("*.pkl")) or all(p.name.startswith("random_states") for p in ckpt.glob("*.pkl"))


def test_student_samples_and_model_card_are_written(unet_run):
    out, _ = unet_run
    assert len(list((out / "samples").glob("*.png"))) == 6
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "tiny-siglip-eval" in card
    assert not re.search(r"\{\{|\}\}|\{%|%\}", card)


def test_hub_token_never_appears_in_logs_or_saved_files(unet_run):
    out, proc = unet_run
    assert "hf_NEVER_LOGGED_12345" not in proc.stdout + proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_NEVER_LOGGED_12345" not in path.read_bytes(), path


def test_an_output_dir_with_another_runs_checkpoints_is_an_early_error(unet_run, assets):
    out, _ = unet_run
    proc = run_script([
        "--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets),
        "--output_dir", str(out), *FAST_ARGS, "--learning_rate", "5e-4",
    ], check=False)
    assert proc.returncode != 0
    assert "holds checkpoints of another run" in proc.stderr and "--learning_rate" in proc.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # untouched


# ------------------------------------------------------------------------------- LoRA, queue, exact
def test_pixel_unet_lora_with_queue_population_saves_a_lora_that_loads(assets, tmp_path):
    out = tmp_path / "out"
    run_script([
        "--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets),
        "--output_dir", str(out), *FAST_ARGS, "--use_lora", "--lora_rank", "4", "--fd_population", "queue",
        "--fd_queue_size", "3", "--learning_rate", "1e-2", "--output_bound", "tanh",
    ])
    info = json.loads((out / "fd_onestep_lora.json").read_text())
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    base = FDOneStepPipeline.from_teacher(info["base_model"], **info["one_step_settings"])
    before = _generate(base, batch_size=2)
    base.load_lora_weights(out)
    after = _generate(base, batch_size=2)
    assert after.shape == (2, 1, 16, 16) and not torch.allclose(before, after)
    assert not (out / "unet").exists()  # a LoRA run publishes the adapter, not a copy of the base


def test_class_conditional_unet_with_exact_population_and_reference_label_histogram(assets, tmp_path):
    hist = tmp_path / "hist.json"
    hist.write_text(json.dumps([5, 1, 1, 1, 1, 1, 1, 1, 1, 1]))
    out = tmp_path / "out"
    proc = run_script([
        "--pretrained_model_name_or_path", assets["teachers"]["unet2d_class"], *encoder_args(assets),
        "--output_dir", str(out), *FAST_ARGS, "--fd_population", "exact", "--fd_micro_batches", "2",
        "--class_label_distribution", "reference", "--class_histogram", str(hist),
    ])
    assert "samples per update = 8" in proc.stderr + proc.stdout
    # 16 validation samples drawn from a skewed histogram leave some class with a single sample: the run goes on
    assert "per-class FD and FJD skipped" in proc.stderr + proc.stdout
    pipe = FDOneStepPipeline.from_pretrained(out)
    assert _generate(pipe, class_labels=[0, 7]).shape == (2, 1, 16, 16)


# ------------------------------------------------------------------------------- latent and text families
def test_dit_family_full_finetune(assets, tmp_path):
    out = tmp_path / "out"
    run_script([
        "--pretrained_model_name_or_path", assets["teachers"]["dit"], *encoder_args(assets),
        "--output_dir", str(out), *FAST_ARGS, "--fd_population", "ema", "--output_bound", "tanh",
    ])
    pipe = FDOneStepPipeline.from_pretrained(out)
    images = _generate(pipe, class_labels=[1, 2])
    assert pipe.family == "dit" and images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_stable_diffusion_lora_with_prompts_file_loads_into_stock_pipeline_too(assets, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    run_script([
        "--pretrained_model_name_or_path", assets["teachers"]["sd"], *encoder_args(assets),
        "--output_dir", str(out), *FAST_ARGS, "--use_lora", "--lora_rank", "2",
        "--prompts_file", assets["prompts_file"], "--fd_population", "queue", "--fd_queue_size", "2",
    ])
    pipe = FDOneStepPipeline.from_teacher(assets["teachers"]["sd"])
    pipe.load_lora_weights(out)
    assert _generate(pipe, prompt=["a red square"]).shape == (1, 3, 16, 16)
    stock = StableDiffusionPipeline.from_pretrained(assets["teachers"]["sd"], safety_checker=None)
    stock.load_lora_weights(out)  # diffusers' own loader reads the same file
    assert any("lora" in n for n, _ in stock.unet.named_parameters())
    # fd_onestep_lora.json (and the model card) say how the stock pipeline takes the same one step
    import diffusers

    info = json.loads((out / "fd_onestep_lora.json").read_text())
    recipe = info["stock_pipeline"]
    assert recipe["pipeline"] == "StableDiffusionPipeline" and recipe["scheduler"] == "DDIMScheduler"
    assert "steps_offset=" in (out / "README.md").read_text()
    stock.scheduler = getattr(diffusers, recipe["scheduler"]).from_config(stock.scheduler.config,
                                                                         **recipe["scheduler_overrides"])
    stock.set_progress_bar_config(disable=True)
    trained = FDOneStepPipeline.from_teacher(info["base_model"], **info["one_step_settings"])
    trained.load_lora_weights(out)
    expected = trained(["a red square"], generator=torch.Generator().manual_seed(2), output_type="pt").images
    got = stock(["a red square"], generator=torch.Generator().manual_seed(2), output_type="pt",
                **recipe["call_kwargs"]).images
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_sd3_flow_family_with_dataset_caption_column(assets, tmp_path):
    out = tmp_path / "out"
    run_script([
        "--pretrained_model_name_or_path", assets["teachers"]["sd3"], *encoder_args(assets),
        "--output_dir", str(out), *FAST_ARGS, "--dataset_name", assets["captions_dataset"],
        "--caption_column", "text", "--fd_population", "exact", "--fd_micro_batches", "2",
    ])
    pipe = FDOneStepPipeline.from_pretrained(out)
    assert pipe.family == "sd3" and pipe.config.prediction_type == "flow"
    assert _generate(pipe, prompt=["two cats"]).shape == (1, 3, 16, 16)


def test_text_model_without_prompts_is_an_early_error(assets, tmp_path):
    proc = run_script([
        "--pretrained_model_name_or_path", assets["teachers"]["sd"], *encoder_args(assets),
        "--output_dir", str(tmp_path / "out"), *FAST_ARGS,
    ], check=False)
    assert proc.returncode != 0 and "--prompts_file" in proc.stderr
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_help_shows_the_defaults_a_run_without_config_writes(unet_run, script):
    """`--help` is truthful: for every argument the command line left out, a run without a config writes into its
    arguments file exactly the default --help shows (three are derived from other arguments, as their help says)."""
    import json

    out, proc = unet_run
    given = {str(a)[2:] for a in proc.args if str(a).startswith("--")}
    saved = json.loads((out / "fd_onestep_run_args.json").read_text())["args"]
    assert saved["config"] is None and saved["config_values"] == {} and saved["embedded_default"] is None
    parser = script.build_parser()
    formatter = parser._get_formatter()  # --help's own: each argument's help as --help prints it
    derived = {"encoder_loss_weights": [1.0] * len(saved["encoders"])}  # "default 1 each"
    # "default: <stats>.classes.safetensors next to each stats file, if there": one entry per stats file
    assert len(saved.pop("class_reference_stats")) == len(saved["reference_stats"])
    assert len(saved.pop("eval_class_reference_stats")) == len(saved["eval_reference_stats"])
    checked = 0
    for action in parser._actions:
        if action.dest in given or action.dest == "help" or action.help == "==SUPPRESS==" or action.dest not in saved:
            continue
        shown = formatter._expand_help(action)
        assert shown.endswith(f"(default: {action.default})"), f"--help does not show {action.dest}'s default"
        expected = derived.get(action.dest, action.default)
        assert saved[action.dest] == expected, f"--{action.dest}: help {action.default!r}, the run {saved[action.dest]!r}"
        checked += 1
    assert checked > 60
