"""The last bad inputs (issue 35): each one gives one line naming the problem and the fix, or a documented
warning, and nothing a user saves or resumes is lost or silently changed.

- a pipeline saved with a LoRA attached loads and gives the same images (the LoRA fused);
- ``export-npz`` then ``import-npz`` keeps the statistics' name, sample count, validation FD and metadata;
- a file that is not an ``.npz``, NaN statistics, a non-UTF-8 prompts file, an uncached surrogate decoder, an
  unknown encoder, ``--learning_rate -1e-4``, an output folder that cannot be created, class labels on a text
  teacher, ``--num_samples 1``: each its own clear line, before any model loads;
- warnings: prompts longer than the text encoder reads, an FD of fewer images than dimensions, resuming a
  finished run, resuming from an older checkpoint (the newer ones are kept aside, not rewritten);
- ``fd_onestep_lora.json``'s ``how_to_load`` is code that runs.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from test_evaluate_pipelines import ENCODER, folders  # noqa: F401 - the fixture
from test_lora_fd_onestep import trained_lora
from test_pipeline_tiny_models import ddpm_teacher
from train_fixtures import FAST_ARGS, encoder_args

from fd_onestep.cli import main as cli
from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline
from fd_onestep.reference_stats import ReferenceStats


def _args(assets, out, *extra):
    return ["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets),
            "--output_dir", str(out), *FAST_ARGS, *extra]


def _error(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "error:" in line]
    assert len(lines) == 1, captured
    return lines[0]


# ------------------------------------------------------------------------------------------ saving
def test_a_pipeline_saved_with_a_lora_attached_loads_and_gives_the_same_images(tmp_path):
    torch.manual_seed(0)
    ddpm_teacher().save_pretrained(tmp_path / "teacher")
    pipe = trained_lora(FDOneStepPipeline.from_teacher(str(tmp_path / "teacher")))
    pipe.set_progress_bar_config(disable=True)
    before = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), output_type="pt").images
    pipe.save_pretrained(tmp_path / "saved")
    weights = (tmp_path / "saved" / "unet" / "diffusion_pytorch_model.safetensors")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        assert not [k for k in f.keys() if "lora_" in k or "base_layer" in k]
    assert any("lora_" in name for name, _ in pipe.denoiser.named_parameters())  # the live model keeps its LoRA
    loaded = FDOneStepPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    after = loaded(batch_size=2, generator=torch.Generator().manual_seed(3), output_type="pt").images
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_how_to_load_in_the_lora_info_is_code_that_loads_the_lora(folders):  # noqa: F811
    from fd_onestep.evaluation import lora_loading_code

    namespace = {}
    exec(lora_loading_code(folders["root"] / "lora"), namespace)
    pipe = namespace["pipe"]
    assert isinstance(pipe, FDOneStepPipeline)
    assert any("lora_" in name for name, _ in pipe.denoiser.named_parameters())


# ---------------------------------------------------------------------------------------- statistics
def test_export_then_import_npz_keeps_name_counts_validation_fd_and_metadata(tmp_path, capsys):
    from fd_onestep.demos.digits import stats_path

    source = tmp_path / "pixels-gray_16.safetensors"
    original = ReferenceStats.load(stats_path("pixels-digits"))
    original.save(source)
    npz = tmp_path / "x.npz"
    assert cli(["export-npz", str(source), str(npz)]) == 0
    with np.load(npz, allow_pickle=False) as f:  # still pytorch-fid's file: mu and sigma
        np.testing.assert_array_equal(f["mu"], original.mu.numpy())
    assert cli(["import-npz", str(npz), "--output_dir", str(tmp_path / "back")]) == 0
    back = ReferenceStats.load(tmp_path / "back" / "pixels-gray_16.safetensors")
    assert back.num_samples == original.num_samples == 1437
    assert back.validation_fd == original.validation_fd and back.encoder_id == original.encoder_id
    assert back.metadata["dataset"] == original.metadata["dataset"]
    assert torch.equal(back.sigma, original.sigma)


def test_import_npz_of_a_file_that_is_not_an_npz_says_so_without_pickle_advice(tmp_path, capsys):
    bad = tmp_path / "stats.npz"
    bad.write_text("mu,sigma\n1,2\n")
    assert cli(["import-npz", str(bad), "--encoder_id", "inception", "--output_dir", str(tmp_path / "o")]) == 2
    line = _error(capsys)
    assert "is not a readable .npz archive" in line and str(bad) in line
    assert "pickle" not in line


def test_nan_statistics_name_their_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    stats = ReferenceStats(mu=torch.zeros(3), sigma=torch.eye(3, dtype=torch.float64))
    stats.mu[1] = float("nan")  # written as it is: the file holds a NaN
    from safetensors.torch import save_file

    save_file({"mu": stats.mu, "sigma": stats.sigma}, str(path), metadata={"format": "fd_onestep.reference_stats"})
    with pytest.raises(ValueError, match=f"reference statistics file '{path}': reference: mu contains NaN"):
        ReferenceStats.load(path)


def test_unknown_encoder_lists_the_bundled_digits_encoders():
    from fd_onestep.encoders import check_encoder_name

    with pytest.raises(ValueError, match="bundled encoders are folders: dinov2-digits, randcnn-digits.*resnet-digits"):
        check_encoder_name("resnet-digits")


def test_an_uncached_surrogate_decoder_hub_id_says_it_is_not_cached(monkeypatch, tmp_path):
    from fd_onestep.memory_savers import load_surrogate_decoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="is a Hub id that is not in the local Hugging Face cache.*hf download "
                                         "madebyollin/taesd"):
        load_surrogate_decoder("madebyollin/taesd", cache_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------- evaluate
def test_evaluate_num_samples_1_is_refused_before_the_pipeline_loads(tmp_path, capsys):
    # the pipeline folder does not exist: an error about it would mean it was loaded first
    argv = ["evaluate", "--pipeline", str(tmp_path / "none"), "--num_samples", "1", "--encoders", ENCODER,
            "--reference_stats", str(tmp_path / "none.safetensors")]
    assert cli(argv) == 2
    assert "--num_samples 1: FD needs a covariance, so at least 2 images" in _error(capsys)


def test_evaluate_a_prompts_file_that_is_not_utf8_names_it(folders, tmp_path, capsys):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a cat\n\xff\xfe a dog\n")
    argv = ["evaluate", "--pipeline", str(folders["root"] / "onestep"), "--prompts_file", str(prompts),
            "--encoders", ENCODER, "--reference_stats", folders["stats"]]
    assert cli(argv) == 2
    line = _error(capsys)
    assert f"--prompts_file '{prompts}' is not UTF-8 text (byte 0xff on line 2)" in line and "iconv" in line


def test_fd_of_fewer_images_than_dimensions_warns(folders, tmp_path, caplog):  # noqa: F811
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(8):  # 8 images against 64-dimensional statistics (pixels-gray:8)
        Image.new("L", (16, 16), color=30 * i).save(images / f"{i}.png")
    with caplog.at_level(logging.WARNING):
        assert cli(["evaluate", "--images", str(images), "--encoders", ENCODER, "--reference_stats",
                    folders["stats"]]) == 0
    assert "FD of 8 images in 64 dimensions: with N <= d the generated covariance has rank at most 7" in caplog.text


# -------------------------------------------------------------------------------------- training args
def test_a_negative_learning_rate_reaches_the_range_check(script, assets, tmp_path):
    with pytest.raises(ValueError, match=r"--learning_rate must be > 0, got -0.0001"):
        script.parse_args(_args(assets, tmp_path / "out", "--learning_rate", "-1e-4"))
    args = script.parse_args(_args(assets, tmp_path / "out", "--learning_rate", "2e-4", "--adam_epsilon", "1e-08"))
    assert args.learning_rate == 2e-4


def test_an_output_dir_that_cannot_be_created_names_the_folder(script, assets, tmp_path):
    with pytest.raises(ValueError, match="--output_dir '/proc/x' cannot be created: '/proc' does not accept new "
                                         "folders"):
        script.parse_args(_args(assets, "/proc/x"))


def test_a_training_prompts_file_that_is_not_utf8_is_an_early_error(script, assets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xff a cat\n")
    args = script.parse_args(["--pretrained_model_name_or_path", assets["teachers"]["sd"], *encoder_args(assets),
                              "--prompts_file", str(prompts), "--output_dir", str(tmp_path / "o"), *FAST_ARGS])
    with pytest.raises(ValueError, match=f"--prompts_file '{prompts}' is not UTF-8 text \\(byte 0xff on line 1\\)"):
        script.check_inputs(args)


def test_class_labels_on_a_text_teacher_are_refused_before_loading(script, assets, tmp_path):
    args = script.parse_args(["--pretrained_model_name_or_path", assets["teachers"]["sd"], *encoder_args(assets),
                              "--prompts_file", assets["prompts_file"], "--class_label_distribution", "reference",
                              "--output_dir", str(tmp_path / "o"), *FAST_ARGS])
    with pytest.raises(ValueError, match="--class_label_distribution reference: .* is a text-to-image model.*drop "
                                         "--class_label_distribution"):
        script.check_inputs(args)


def test_prompts_longer_than_the_text_encoder_reads_are_named_once(assets, caplog):
    from fd_onestep.training.checks import prompt_token_limits, warn_long_prompts

    pipe = FDOneStepPipeline.from_teacher(assets["teachers"]["sd"])
    limits = prompt_token_limits(pipe)
    (limit,) = {n for *_, n in limits}
    with caplog.at_level(logging.WARNING):
        assert warn_long_prompts(["a cat", " ".join(["dog"] * 1200)], limits) == 1
    assert f"1 of 2 prompts (--prompts_file) are longer than the text encoder's max_sequence_length of {limit}" \
           in caplog.text
    assert "will result in indexing errors" not in caplog.text


# ----------------------------------------------------------------------------------------------- resume
def _checkpoint(out, step):
    from fd_onestep.training.checkpoints import CHECKPOINT_MARKER

    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_MARKER).write_text(json.dumps({"step": step, "files": {}}))
    return folder


def test_resuming_from_an_older_checkpoint_keeps_the_newer_ones_aside_and_names_them(tmp_path, caplog):
    from fd_onestep.training.checkpoints import latest_checkpoint, set_aside_newer_checkpoints

    out = tmp_path / "out"
    first, *newer = [_checkpoint(out, step) for step in (2, 4, 6)]
    with caplog.at_level(logging.WARNING):
        moved = set_aside_newer_checkpoints(out, first)
    target = out / "superseded" / "after-checkpoint-2"
    assert moved == [target / "checkpoint-4", target / "checkpoint-6"] and all(p.is_dir() for p in moved)
    assert f"resuming from checkpoint-2, older than checkpoint-4, checkpoint-6: those were moved to {target}" \
           in caplog.text
    assert latest_checkpoint(out) == first  # the resumed run writes its own checkpoint-4, replacing nothing
    assert set_aside_newer_checkpoints(out, first) == []


def test_resuming_a_finished_run_says_so_in_one_line(tmp_path, caplog):
    from fd_onestep.training.checkpoints import note_finished_run

    with caplog.at_level(logging.WARNING):
        assert note_finished_run(4, 4, tmp_path / "checkpoint-4") is True
        assert note_finished_run(2, 4, tmp_path / "checkpoint-2") is False
    assert caplog.text.count("\n") == 1
    assert "checkpoint-4 is at step 4, the run's last (--max_train_steps 4): nothing left to train" in caplog.text


# ------------------------------------------------------------------------------------------ preemption
def _sigterm_the_process_group(cmd, out, wait_for, delay):
    """Start ``cmd`` in its own process group, wait for ``wait_for`` to exist, then SIGTERM the whole group (what
    SLURM and Kubernetes do); the stop checkpoint is slowed by ``delay`` s. Returns (returncode, stderr)."""
    import os
    import signal
    import subprocess
    import time

    from train_fixtures import REPO_ROOT, SUBPROCESS_ENV

    from fd_onestep.training.preemption import SLOW_STOP_CHECKPOINT_ENV

    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**SUBPROCESS_ENV, SLOW_STOP_CHECKPOINT_ENV: str(delay)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not wait_for.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


def _preemption_args(assets, out, steps):
    return ["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets), *FAST_ARGS,
            "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--num_cpu_threads", "1",
            "--num_validation_images", "0", "--num_validation_samples", "0", "--output_dir", str(out)]


def test_sigterm_to_the_group_of_a_one_process_launch_names_the_checkpoint_it_keeps_and_resumes_exactly(
        script, assets, tmp_path, caplog):
    """accelerate launch (one process) kills its child 5 s after SIGTERM: a stop checkpoint that takes longer is
    cut off; the script says so at the signal, naming the newest complete checkpoint, and the resumed run ends
    bit-identical to an uninterrupted one."""
    from train_fixtures import SCRIPT, accelerate_launch

    steps, out, reference = 4, tmp_path / "interrupted", tmp_path / "reference"
    common = _preemption_args(assets, out, steps)
    code, stderr = _sigterm_the_process_group([*accelerate_launch(1), str(SCRIPT), *common], out,
                                              out / "checkpoint-2", delay=6)
    assert code != 0  # the launcher killed the script
    assert "accelerate launch (one process) kills this process 5 s after its SIGTERM" in stderr, stderr[-3000:]
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept and f"{kept[-1]} is the newest complete checkpoint" in stderr
    with caplog.at_level(logging.WARNING):
        script.main(script.parse_args([*common, "--resume_from_checkpoint", "latest"]))
    cut = sorted(p.name for p in out.glob(".checkpoint-*.partial"))
    assert cut and f"{', '.join(cut)} never completed" in caplog.text and f"resuming from {kept[-1]}" in caplog.text
    script.main(script.parse_args([*_preemption_args(assets, reference, steps)]))
    resumed = _safetensors(out / "unet" / "diffusion_pytorch_model.safetensors")
    uninterrupted = _safetensors(reference / "unet" / "diffusion_pytorch_model.safetensors")
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_sigterm_to_the_group_of_a_two_process_launch_writes_the_checkpoint_of_the_step_reached(assets, tmp_path):
    """accelerate launch --multi_gpu (torch elastic) gives its ranks 30 s after SIGTERM: a stop checkpoint slowed
    beyond accelerate's one-process 5 s is written at the step reached, and the same command with
    --resume_from_checkpoint latest finishes bit-identical to an uninterrupted two-process run."""
    from train_fixtures import SCRIPT, accelerate_launch, run_script

    steps, out, reference = 4, tmp_path / "interrupted", tmp_path / "reference"
    launch = [*accelerate_launch(2), str(SCRIPT)]
    code, stderr = _sigterm_the_process_group([*launch, *_preemption_args(assets, out, steps)], out,
                                              out / "checkpoint-2", delay=6)
    assert "Traceback" not in stderr, stderr[-3000:]
    reached = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert f"Stopped by SIGTERM at step {reached}" in stderr and 2 < reached <= steps, stderr[-3000:]
    assert not list(out.glob(".checkpoint-*.partial"))
    run_script([*_preemption_args(assets, out, steps), "--resume_from_checkpoint", "latest"], launcher=launch[:-1])
    run_script(_preemption_args(assets, reference, steps), launcher=launch[:-1])
    resumed = _safetensors(out / "unet" / "diffusion_pytorch_model.safetensors")
    uninterrupted = _safetensors(reference / "unet" / "diffusion_pytorch_model.safetensors")
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


# ------------------------------------------------------------------------------------------------ plan
def test_plan_of_a_huge_batch_runs_the_fd_math_at_a_bounded_batch_and_extrapolates(monkeypatch):
    from fd_onestep import plan

    ran = []

    def fake_run(fd_loss, dims, batch):  # linear in the batch, as the real FD math is above d rows
        ran.append(batch)
        return 1000 + 10 * batch, 7 * batch

    monkeypatch.setattr(plan, "_run_fd_math", fake_run)
    monkeypatch.setattr(plan, "_FD_MATH_CACHE", {})
    peak, flops = plan._measure_fd_math(None, {"inception": 2048}, 1_000_000)
    assert max(ran) <= plan.FD_MATH_MAX_BATCH  # 10^6 x 2048 features would be 16 GB
    assert (peak, flops) == (1000 + 10 * 1_000_000, 7 * 1_000_000)


def test_plan_measures_batches_1_2_8_and_the_requested_one(monkeypatch):
    from fd_onestep import plan

    seen = {}
    monkeypatch.setattr(plan, "_plan_in_mode", lambda settings, folder, batches: seen.setdefault("batches", batches))
    plan.make_plan(plan.PlanSettings(teacher="sd15", batch_size=2))
    assert seen["batches"] == [1, 2, 8]  # the largest batch comes from 2 and 8, as the README says
    seen.clear()
    plan.make_plan(plan.PlanSettings(teacher="sd15", batch_size=32))
    assert seen["batches"] == [1, 2, 8, 32]


def test_plan_with_a_tiny_decoder_for_other_latents_is_one_line(capsys):
    from fd_onestep.demos import digits

    argv = ["plan", "--teacher", str(digits.TEXT_TEACHER_PATH), "--encoders", digits.encoder_spec("dinov2-digits"),
            "--lora", "--surrogate_decoder", "taef1"]
    assert cli(argv) == 2
    assert "--surrogate_decoder has 16 latent / 3 image channels but the teacher's VAE has 4 / 1" in _error(capsys)


def test_encoder_names_with_a_dot_key_the_fd_loss():
    from fd_onestep.losses import FDLoss, MultiEncoderFDLoss
    from fd_onestep.populations import build_population

    name = "/home/a.b/encoders/dinov2-digits"
    ref = ReferenceStats(mu=torch.zeros(3, dtype=torch.float64), sigma=torch.eye(3, dtype=torch.float64))
    loss = MultiEncoderFDLoss({name: FDLoss(ref, build_population("ema", 3, beta=0.9))})
    assert list(loss.losses) == [name] and name in loss.losses and loss.losses[name].scale > 0
    value, raw = loss({name: torch.randn(4, 3, requires_grad=True)})
    assert set(raw) == {name} and torch.isfinite(value)


def test_the_launchers_grace_is_read_from_the_parent_process(monkeypatch):
    import subprocess
    import sys

    from fd_onestep.training import preemption

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    fake_launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m",
                                      "accelerate.commands.launch"])
    try:
        assert preemption.launcher_grace(fake_launcher.pid) == ("accelerate launch (one process)", 5.0)
    finally:
        fake_launcher.kill()
        fake_launcher.wait()
    assert preemption.launcher_grace()[1] is None  # pytest is no launcher
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert preemption.launcher_grace()[1] == 30.0
