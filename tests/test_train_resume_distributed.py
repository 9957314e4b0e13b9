"""Resuming continues bit-identically, and several processes compute the single-process gradient.

- N steps straight == N/2 steps + resume + N/2 steps, on CPU: weights, optimizer, lr schedule, FD
  population, generator EMA and sampling RNG all continue exactly (the run is interrupted the way a job time
  limit would, with ``--stop_after_steps``).
- ``accelerate launch --multi_gpu --num_processes 2`` (2 real CPU processes, gloo) with batch b gives the
  same first-step gradient as 1 process with batch 2b, to <= 1e-6 relative. The networks run in float64
  (``--debug_float64``) so that the comparison measures the algorithm (global population, gradient scaling),
  not float32 round-off, which differs between batch shapes of 4 and 8 at ~1e-6 on its own.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import FAST_ARGS, accelerate_launch, encoder_args, run_script

pytestmark = pytest.mark.slow


def _common(assets, population):
    return [
        "--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets), *FAST_ARGS,
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "2",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--use_ema", "--ema_decay", "0.7",
        "--fd_population", population, "--fd_queue_size", "2", "--fd_micro_batches", "2", "--fd_ema_beta", "0.5",
        "--keep_best_by", "tiny-dinov2",
    ]


def _assert_same_safetensors(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{a.name}:{key} differs"


# channels_last (the offline default's layout) must survive save / load of the weights and optimizer state
@pytest.mark.parametrize("population,layout", [("ema", "--channels_last"), ("queue", "--no-channels_last")])
def test_resume_continues_bit_identically(assets, tmp_path, population, layout):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [*_common(assets, population), layout]
    run_script([*args, "--output_dir", str(straight)])
    # a fresh run from the straight run's step-2 checkpoint (the route of --stop_after_steps and "latest" in one
    # folder: test_train_sdxl_sana.py); with other arguments that is an early error
    checkpoint = str(straight / "checkpoint-2")
    proc = run_script([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", checkpoint,
                       "--fd_ema_beta", "0.9"], check=False)
    assert proc.returncode != 0 and "--fd_ema_beta: 0.5 (saved) vs 0.9 (now)" in proc.stderr
    proc = run_script([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", checkpoint])
    assert "resumed at step 2" in proc.stderr

    _assert_same_safetensors(straight / "unet" / "diffusion_pytorch_model.safetensors",
                             resumed / "unet" / "diffusion_pytorch_model.safetensors")
    for name in ("fd_populations.safetensors", "generator_ema.safetensors", "training_state.safetensors",
                 "unet/diffusion_pytorch_model.safetensors"):
        _assert_same_safetensors(straight / "checkpoint-4" / name, resumed / "checkpoint-4" / name)
    opt_a = torch.load(straight / "checkpoint-4" / "optimizer.bin", weights_only=True)
    opt_b = torch.load(resumed / "checkpoint-4" / "optimizer.bin", weights_only=True)
    for pid, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_b["state"][pid][key]), f"optimizer {pid}/{key} differs"
    sched_a = torch.load(straight / "checkpoint-4" / "scheduler.bin", weights_only=True)
    sched_b = torch.load(resumed / "checkpoint-4" / "scheduler.bin", weights_only=True)
    assert sched_a["_last_lr"] == sched_b["_last_lr"] and sched_a["last_epoch"] == sched_b["last_epoch"]
    summary_a = json.loads((straight / "fd_onestep_summary.json").read_text())
    summary_b = json.loads((resumed / "fd_onestep_summary.json").read_text())
    assert summary_a["final_population_fds"] == summary_b["final_population_fds"]


def test_resume_from_a_checkpoint_that_does_not_exist_is_an_early_error(assets, tmp_path):
    proc = run_script([*_common(assets, "ema"), "--output_dir", str(tmp_path / "out"),
                       "--resume_from_checkpoint", str(tmp_path / "nowhere" / "checkpoint-7")], check=False)
    assert proc.returncode != 0 and "no such checkpoint folder" in proc.stderr


def _first_step_grad(assets, out, processes, batch, population, condition="marginal"):
    dump = out / "grad.safetensors"
    teacher = assets["teachers"]["unet2d_class" if condition == "joint" else "unet2d"]
    run_script([
        "--pretrained_model_name_or_path", teacher, *encoder_args(assets), *FAST_ARGS, "--fd_condition", condition,
        "--output_dir", str(out), "--max_train_steps", "1", "--train_batch_size", str(batch),
        "--fd_population", population, "--fd_micro_batches", "2", "--fd_warmup_samples", "24",
        "--num_validation_samples", "0", "--num_validation_images", "0",
        "--debug_dump_first_step_grad", str(dump), "--debug_float64",
    ], launcher=accelerate_launch(processes) if processes > 1 else [])  # one process: plain python, as users
    from safetensors import safe_open

    with safe_open(str(dump), "pt") as f:
        assert f.metadata()["processes"] == str(processes)
    return load_file(str(dump))


@pytest.mark.distributed
@pytest.mark.parametrize("population,condition", [("ema", "marginal"), ("exact", "marginal"), ("exact", "joint")])
def test_two_processes_give_the_single_process_gradient_of_the_same_global_batch(assets, tmp_path, population,
                                                                                 condition):
    """Also for the joint FD-loss of a class-conditional teacher: every process's rows carry their own labels."""
    one = _first_step_grad(assets, tmp_path / "one", processes=1, batch=8, population=population, condition=condition)
    two = _first_step_grad(assets, tmp_path / "two", processes=2, batch=4, population=population, condition=condition)
    assert one.keys() == two.keys() and len(one) > 10
    flat_one = torch.cat([one[k].double().flatten() for k in sorted(one)])
    flat_two = torch.cat([two[k].double().flatten() for k in sorted(one)])
    assert flat_one.norm() > 0
    relative = float((flat_two - flat_one).norm() / flat_one.norm())
    assert relative <= 1e-6, f"2-process gradient differs from 1-process by {relative:.2e} (relative)"


def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step(assets, tmp_path):
    """Preemption signals may reach any process: the stop flag is summed over processes after every step
    (gloo here, on the process's device), so both write the same checkpoint and exit cleanly."""
    import signal
    import subprocess
    import sys
    import time

    import psutil
    from train_fixtures import REPO_ROOT, SCRIPT, SUBPROCESS_ENV

    out, first_step = tmp_path / "out", tmp_path / "first_step.safetensors"
    cmd = [*accelerate_launch(2), str(SCRIPT), "--pretrained_model_name_or_path", assets["teachers"]["unet2d"],
           *encoder_args(assets), *FAST_ARGS, "--max_train_steps", "30", "--checkpointing_steps", "0",
           "--output_dir", str(out), "--debug_dump_first_step_grad", str(first_step)]
    launcher = subprocess.Popen(cmd, cwd=REPO_ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not first_step.exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if str(SCRIPT) in " ".join(p.cmdline())]
    (second,) = [p for p in workers if p.environ().get("RANK") == "1"]
    second.send_signal(signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, stderr[-4000:]
    checkpoints = [p.name for p in out.glob("checkpoint-*")]
    assert len(checkpoints) == 1 and "SIGTERM received" in stderr
    step = int(checkpoints[0].split("-")[1])
    assert step < 30 and f"Stopped by a signal to another process at step {step}" in stderr
