"""Nothing is lost: a run is never overwritten, two runs never share a folder, SIGTERM checkpoints and resumes bit
for bit, resume checks file contents (not path spellings), damaged checkpoints are skipped or named, and bad input
fails before any model loads with one `error:` line."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_fixtures import FAST_ARGS, REPO_ROOT, SCRIPT, SUBPROCESS_ENV, encoder_args, run_script


def _args(assets, out, *extra, teacher="unet2d", encoders=("dinov2", "siglip")):
    return ["--pretrained_model_name_or_path", assets["teachers"][teacher], *encoder_args(assets, encoders),
            "--output_dir", str(out), *FAST_ARGS, *extra]


def _tree_digest(folder: Path) -> dict:
    """{relative path: (sha256, mtime_ns)} of every file under ``folder``."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------------ never overwrite a run
def test_a_rerun_without_resume_is_refused_and_names_both_ways_on(script, assets, tmp_path):
    out = tmp_path / "out"
    script.main(script.parse_args(_args(assets, out, "--checkpointing_steps", "1")))
    before = {p.name: _tree_digest(p) for p in out.glob("checkpoint-*")}
    assert set(before) == {"checkpoint-1", "checkpoint-2"}
    with pytest.raises(script.RunError) as err:
        script.main(script.parse_args(_args(assets, out, "--checkpointing_steps", "1")))
    assert "--resume_from_checkpoint latest" in str(err.value) and "--overwrite_output_dir" in str(err.value)
    assert {p.name: _tree_digest(p) for p in out.glob("checkpoint-*")} == before


def test_overwrite_output_dir_starts_the_run_over(script, assets, tmp_path):
    out = tmp_path / "out"
    script.main(script.parse_args(_args(assets, out, "--checkpointing_steps", "1", "--max_train_steps", "3")))
    assert (out / "checkpoint-3").is_dir()
    summary = script.main(script.parse_args(_args(assets, out, "--checkpointing_steps", "1",
                                                  "--overwrite_output_dir")))
    assert summary["global_step"] == 2
    # the earlier run's step-3 checkpoint is gone: `latest` can never pick it up for this run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    with pytest.raises(ValueError, match="pass one of the two"):
        script.parse_args(_args(assets, out, "--overwrite_output_dir", "--resume_from_checkpoint", "latest"))


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_cleaned(script, assets, tmp_path, caplog):
    import socket

    from fd_onestep.training.output_dir import LOCK_FILE

    out = tmp_path / "out"
    out.mkdir()
    # a live process on this host (our parent) holds the folder
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "x"}))
    with pytest.raises(script.RunError, match=f"in use by another run \\(PID {os.getppid()}"):
        script.main(script.parse_args(_args(assets, out)))
    assert not list(out.glob("checkpoint-*"))
    # a process that has ended: its lock is stale, removed with a warning, and the run goes on
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "x"}))
    with caplog.at_level("WARNING"):
        summary = script.main(script.parse_args(_args(assets, out)))
    assert summary["global_step"] == 2 and "stale lock" in caplog.text
    assert not (out / LOCK_FILE).exists()  # released at the end of the run


def test_only_the_main_process_takes_the_lock_and_every_process_learns_the_refusal(script, monkeypatch):
    """The refusal travels as a flag broadcast from the main process, on the process's device."""
    from types import SimpleNamespace

    import accelerate.utils

    sent = []

    def broadcast(tensor, from_process=0):
        sent.append((tensor.device, from_process))
        return torch.ones_like(tensor)  # the main process refused

    monkeypatch.setattr(accelerate.utils, "broadcast", broadcast)
    other = SimpleNamespace(num_processes=2, device=torch.device("cpu"), is_main_process=False)
    with pytest.raises(script.RunError, match="main process refused"):
        script.raise_if_main_refused(other, None)
    assert sent == [(torch.device("cpu"), 0)]


def test_rerunning_the_readme_text_to_image_command_leaves_the_checkpoints_untouched(assets, tmp_path):
    """README's SD3 command (prompts file, exact population, LoRA, bf16) at CI size, twice on one folder."""
    out = tmp_path / "sd3-onestep-lora"
    command = ["--pretrained_model_name_or_path", assets["teachers"]["sd3"], *encoder_args(assets, ("dinov2",)),
               "--prompts_file", assets["prompts_file"], "--fd_population", "exact", "--fd_micro_batches", "2",
               "--train_batch_size", "2", "--use_lora", "--mixed_precision", "bf16", "--output_dir", str(out),
               "--max_train_steps", "2", "--checkpointing_steps", "1", "--learning_rate", "1e-4",
               "--lr_warmup_steps", "0", "--validation_steps", "0", "--num_validation_images", "2",
               "--num_validation_samples", "0", "--sample_batch_size", "4", "--report_to", "none"]
    run_script(command)
    before = _tree_digest(out)
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]
    again = run_script(command, check=False)
    assert again.returncode == 2
    output = again.stdout + again.stderr
    assert "Traceback" not in output and output.count("error:") == 1
    assert "--resume_from_checkpoint latest" in output and "--overwrite_output_dir" in output
    assert _tree_digest(out) == before


# ------------------------------------------------------------------------------------ preemption
def test_sigterm_checkpoints_the_step_reached_and_the_resumed_run_equals_an_uninterrupted_one(script, assets,
                                                                                            tmp_path):
    """A real process gets SIGTERM mid-run; its resume (and the uninterrupted reference) run in-process, on one
    thread like the subprocess, so the three see the same float round-off."""
    steps = 12
    common = ["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets), *FAST_ARGS,
              "--max_train_steps", str(steps), "--checkpointing_steps", "0", "--num_cpu_threads", "1"]
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    first_step = tmp_path / "first_step.safetensors"  # written during step 1: training has started
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *common, "--output_dir", str(interrupted),
                             "--debug_dump_first_step_grad", str(first_step)],
                            cwd=REPO_ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not first_step.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    assert "Traceback" not in stderr and "SIGTERM received" in stderr
    checkpoints = [p.name for p in interrupted.glob("checkpoint-*")]
    assert len(checkpoints) == 1, checkpoints
    reached = int(checkpoints[0].split("-")[1])
    assert 1 <= reached < steps and f"Stopped by SIGTERM at step {reached}" in stderr
    assert not (interrupted / "model_index.json").exists()

    script.main(script.parse_args([*common, "--output_dir", str(interrupted), "--resume_from_checkpoint", "latest"]))
    script.main(script.parse_args([*common, "--output_dir", str(reference)]))
    resumed = _weights(interrupted / "unet" / "diffusion_pytorch_model.safetensors")
    uninterrupted = _weights(reference / "unet" / "diffusion_pytorch_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    summaries = [json.loads((d / "fd_onestep_summary.json").read_text()) for d in (interrupted, reference)]
    assert summaries[0]["final_population_fds"] == summaries[1]["final_population_fds"]


def test_every_process_stops_after_the_same_step(script, monkeypatch):
    """The stop flag is summed over processes (on the process's device): a signal to any one stops all."""
    from types import SimpleNamespace

    reduced = []

    def reduce(tensor, reduction):
        reduced.append((tensor.device, reduction))
        return tensor + 1  # another process received the signal

    request = script.StopRequest()
    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=reduce)
    assert request.agreed(accelerator) is True and request.received is None
    assert reduced == [(torch.device("cpu"), "sum")]


# ------------------------------------------------------------------------------------ resume identity by content
def _text_args(assets, out, prompts, *extra):
    return ["--pretrained_model_name_or_path", assets["teachers"]["sd"], *encoder_args(assets, ("dinov2",)),
            "--prompts_file", str(prompts), "--output_dir", str(out), *FAST_ARGS, "--use_lora", "--lora_rank", "2",
            "--num_validation_images", "0", "--num_validation_samples", "0", *extra]


def test_resume_compares_the_prompts_file_by_content_not_by_path(script, assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a red square\na blue circle\n")
    out = tmp_path / "out"
    script.main(script.parse_args(_text_args(assets, out, "prompts.txt", "--stop_after_steps", "1")))
    # the same file spelled as an absolute path: the same run, it resumes
    summary = script.main(script.parse_args(_text_args(assets, out, tmp_path / "prompts.txt", "--stop_after_steps",
                                                       "2", "--resume_from_checkpoint", "latest")))
    assert summary["global_step"] == 2
    # the same path with other prompts: another run, refused before anything loads
    Path("prompts.txt").write_text("a red square\na green cat\n")
    with pytest.raises(ValueError, match="--prompts_file: the file's content changed"):
        script.main(script.parse_args(_text_args(assets, out, "prompts.txt", "--resume_from_checkpoint", "latest")))


def test_resume_compares_the_reference_statistics_by_content(script, assets, tmp_path):
    import shutil

    stats = tmp_path / "stats.safetensors"
    shutil.copy(assets["stats"]["dinov2"], stats)
    argv = ["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], "--encoders", assets["encoders"]["dinov2"],
            "--reference_stats", str(stats), "--output_dir", str(tmp_path / "out"), *FAST_ARGS]
    script.main(script.parse_args([*argv, "--stop_after_steps", "1"]))
    from fd_onestep.reference_stats import ReferenceStats

    ref = ReferenceStats.load(stats)
    ref.mu = ref.mu + 1.0  # recomputed in place, e.g. on another dataset
    ref.save(stats)
    with pytest.raises(ValueError, match="--reference_stats: the file's content changed"):
        script.main(script.parse_args([*argv, "--resume_from_checkpoint", "latest"]))


def test_a_caption_dataset_enters_the_fingerprint_by_its_datasets_fingerprint(script, assets, tmp_path):
    args = script.parse_args(["--pretrained_model_name_or_path", assets["teachers"]["sd"],
                              *encoder_args(assets, ("dinov2",)), "--dataset_name", assets["captions_dataset"],
                              "--output_dir", str(tmp_path)])
    fingerprint = script.run_fingerprint(args, 1, script.load_caption_dataset(args)._fingerprint)
    assert fingerprint["dataset_fingerprint"] == script.load_caption_dataset(args)._fingerprint
    assert all(v.startswith("sha256:") for v in fingerprint["reference_stats"])


# ------------------------------------------------------------------------------------ damaged checkpoints
def _two_checkpoints(script, assets, out):
    script.main(script.parse_args(_args(assets, out, "--checkpointing_steps", "1", "--stop_after_steps", "2",
                                        "--max_train_steps", "3")))
    return out / "checkpoint-1", out / "checkpoint-2"


def test_latest_skips_a_truncated_population_file_and_says_why(script, assets, tmp_path, caplog):
    out = tmp_path / "out"
    _, second = _two_checkpoints(script, assets, out)
    population = second / "fd_populations.safetensors"
    population.write_bytes(population.read_bytes()[: population.stat().st_size // 2])
    with caplog.at_level("INFO"):
        summary = script.main(script.parse_args(_args(assets, out, "--max_train_steps", "3",
                                                      "--checkpointing_steps", "0",
                                                      "--resume_from_checkpoint", "latest")))
    assert "skipped damaged checkpoint-2" in caplog.text and str(population) in caplog.text
    assert "resuming from checkpoint-1" in caplog.text and "resumed at step 1" in caplog.text
    assert summary["global_step"] == 3


def test_a_named_checkpoint_without_its_optimizer_is_a_clear_error_naming_the_file(script, assets, tmp_path):
    out = tmp_path / "out"
    _, second = _two_checkpoints(script, assets, out)
    (second / "optimizer.bin").unlink()
    with pytest.raises(script.RunError, match=f"{second}' is damaged: {second / 'optimizer.bin'} is missing"):
        script.main(script.parse_args(_args(assets, out, "--max_train_steps", "3",
                                            "--resume_from_checkpoint", str(second))))


def test_a_named_truncated_population_file_is_a_clear_error_naming_it(script, assets, tmp_path):
    out = tmp_path / "out"
    _, second = _two_checkpoints(script, assets, out)
    population = second / "fd_populations.safetensors"
    population.write_bytes(population.read_bytes()[:100])
    with pytest.raises(script.RunError, match=f"{population}.*cannot be read as safetensors"):
        script.main(script.parse_args(_args(assets, out, "--max_train_steps", "3",
                                            "--resume_from_checkpoint", "checkpoint-2")))


# ------------------------------------------------------------------------------------ fail before any model loads
@pytest.fixture
def no_model_loads(monkeypatch):
    """The teacher and the encoders cannot load: a test using this proves its error comes before them."""
    import fd_onestep.encoders
    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(FDOneStepPipeline, "from_teacher", classmethod(refuse))
    monkeypatch.setattr(fd_onestep.encoders, "load_encoder", refuse)


def test_an_encoder_name_typo_fails_before_the_teacher_loads(script, assets, tmp_path, no_model_loads):
    argv = ["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], "--encoders", "dinvo2",
            "--reference_stats", assets["stats"]["dinov2"], "--output_dir", str(tmp_path / "out"), *FAST_ARGS]
    with pytest.raises(ValueError, match="--encoders: Unknown encoder 'dinvo2'. Known names: inception, dinov2"):
        script.main(script.parse_args(argv))


def test_an_encoder_name_typo_is_one_error_line_without_a_traceback(assets, tmp_path):
    argv = ["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], "--encoders", "dinvo2",
            "--reference_stats", assets["stats"]["dinov2"], "--output_dir", str(tmp_path / "out"), *FAST_ARGS]
    proc = run_script(argv, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [f"train_fd_onestep.py: error: --encoders: Unknown encoder 'dinvo2'. {errors[0].split('. ', 1)[1]}"]


def test_under_accelerate_launch_the_error_is_printed_once(assets, tmp_path):
    """accelerate's launcher re-raises its child's stderr: the line goes to stdout there, so it appears once."""
    from train_fixtures import accelerate_launch

    argv = ["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], "--encoders", "dinvo2",
            "--reference_stats", assets["stats"]["dinov2"], "--output_dir", str(tmp_path / "out"), *FAST_ARGS]
    proc = run_script(argv, launcher=accelerate_launch(1), check=False)
    # the launcher exits 1 for any failing child, not the script's 2 (docs/what_happens_when.md says so)
    assert proc.returncode == 1 and (proc.stdout + proc.stderr).count("Unknown encoder 'dinvo2'") == 1
    assert "train_fd_onestep.py: error: --encoders: Unknown encoder 'dinvo2'" in proc.stdout


def test_statistics_of_another_encoder_and_nan_statistics_fail_before_any_model_loads(script, assets, tmp_path,
                                                                                    no_model_loads):
    base = ["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], "--encoders", assets["encoders"]["dinov2"],
            "--output_dir", str(tmp_path / "out"), *FAST_ARGS]
    with pytest.raises(ValueError, match="computed with encoder 'siglip:tiny-siglip.*not 'tiny-dinov2'"):
        script.main(script.parse_args([*base, "--reference_stats", assets["stats"]["siglip"]]))
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(assets["stats"]["dinov2"], framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["mu"][0] = float("nan")  # written around ReferenceStats.save, which refuses it
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="NaN"):
        script.main(script.parse_args([*base, "--reference_stats", str(tmp_path / "nan.safetensors")]))


def test_prompts_and_resolution_fail_before_any_model_loads(script, assets, tmp_path, no_model_loads):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="has no prompts"):
        script.main(script.parse_args(_text_args(assets, tmp_path / "out", empty)))
    text = ["--pretrained_model_name_or_path", assets["teachers"]["sd"], *encoder_args(assets, ("dinov2",)),
            "--output_dir", str(tmp_path / "out"), *FAST_ARGS]
    with pytest.raises(ValueError, match="text-to-image model.*--prompts_file"):
        script.main(script.parse_args(text))
    with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling factor 2"):
        script.main(script.parse_args([*text, "--prompts_file", assets["prompts_file"], "--resolution", "15"]))


def test_lora_targets_matching_no_module_fail_before_any_model_loads_naming_the_layers(script, assets, tmp_path,
                                                                                      no_model_loads):
    with pytest.raises(ValueError, match=r"--lora_target_modules \['to_qq'\] match no module of the teacher's unet "
                                         r"\(UNet2DConditionModel\).*to_q.*pass some of those"):
        script.main(script.parse_args(_text_args(assets, tmp_path / "out", assets["prompts_file"],
                                                 "--lora_target_modules", "to_q", "to_qq")))


def test_a_lora_rank_above_the_layers_width_warns(script, assets, tmp_path, caplog):
    from accelerate import PartialState

    PartialState()  # the script's logger is accelerate's
    with caplog.at_level("WARNING"):
        script.check_inputs(script.parse_args(_args(assets, tmp_path / "out", "--use_lora", "--lora_rank", "512")))
    assert "--lora_rank 512 exceeds the width of" in caplog.text and "Lower --lora_rank to at most 16" in caplog.text
