"""Sharded training (FSDP2) proven on CPU: two gloo processes equal one, hold half each, and resume exactly.

``tests/sharded_training_worker.py`` trains the tiny FLUX teacher and the bundled digits UNet, full fine-tune and
LoRA, for 4 steps with the library's training-step code (``OneStepGenerator``, an FD-loss over an EMA population,
diffusers' ``EMAModel``), once in 1 process (global batch 8) and once in 2 processes (4 rows each) launched with
``accelerate launch --use_fsdp --fsdp_version 2``: the route a GPU run takes (``enable_fsdp2``, then accelerate's
own ``prepare`` / ``save_state`` / ``load_state``), apart from the device.
"""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import REPO_ROOT, SUBPROCESS_ENV

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RUNS = ("flux", "flux-lora", "digits")  # LoRA: FLUX's (the trainer's test adds a FLUX LoRA run of its own)
WORKER = REPO_ROOT / "tests" / "sharded_training_worker.py"


def _launch(out, processes):
    import subprocess

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
    if processes > 1:
        cmd += ["--use_fsdp", "--fsdp_version", "2"]
    proc = subprocess.run([*cmd, str(WORKER), str(out), *RUNS], cwd=REPO_ROOT, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-8000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    _launch(root / "one", 1)
    _launch(root / "two", 2)
    return root


def _max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


@pytest.mark.parametrize("run", RUNS)
def test_two_sharded_processes_train_the_weights_and_ema_of_one_process(runs, run):
    """Gathered weights (and the EMA of the weights, kept over each process's shards) equal the 1-process run of
    the same global batch to 1e-5 in float32, while training moved them far more than that."""
    initial = load_file(str(runs / "one" / run / "straight" / "initial.safetensors"))
    for name in ("weights", "ema"):
        one = load_file(str(runs / "one" / run / "straight" / f"{name}.safetensors"))
        two = load_file(str(runs / "two" / run / "straight" / f"{name}.safetensors"))
        assert all(t.dtype == torch.float32 for t in one.values())
        assert _max_relative_difference(one, two) <= 1e-5, name
    trained = load_file(str(runs / "one" / run / "straight" / "weights.safetensors"))
    assert _max_relative_difference(initial, trained) > 1e-3  # the comparison is not between untrained weights


@pytest.mark.parametrize("run", RUNS)
def test_each_process_holds_half_of_the_parameters_gradients_and_optimizer_state(runs, run):
    """Measured from the local shards after the first step; a LoRA run shards the frozen base weights too."""
    shards = [json.loads((runs / "two" / run / "straight" / f"shards-{r}.json").read_text()) for r in (0, 1)]
    full, full_trainable = shards[0]["full_parameters"], shards[0]["full_trainable_parameters"]
    momentum_per_parameter = 1  # SGD with momentum: one buffer per trainable element
    for local in shards:
        assert abs(local["parameters"] / full - 0.5) < 0.01
        assert abs(local["gradients"] / full_trainable - 0.5) < 0.01
        assert abs(local["optimizer_state"] / (momentum_per_parameter * full_trainable) - 0.5) < 0.01
    assert sum(s["parameters"] for s in shards) >= full  # dim-0 shards, padded where a size is odd


@pytest.mark.parametrize("run", RUNS)
def test_resuming_a_sharded_checkpoint_continues_bit_for_bit(runs, run):
    """The 2-process run checkpointed at step 2 (accelerate's save_state: model and optimizer as sharded
    torch.distributed.checkpoint folders, the EMA's shards beside them, written atomically); a fresh run resumed from
    it ends bitwise equal to the uninterrupted one."""
    checkpoint = runs / "two" / run / "straight" / "checkpoint-2"
    assert (checkpoint / "fd_onestep_checkpoint.json").is_file()
    assert {p.name for p in checkpoint.iterdir()} >= {"pytorch_model_fsdp_0", "optimizer_0", "generator_ema"}
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2  # one file of shards per process
    for name in ("weights", "ema"):
        straight = load_file(str(runs / "two" / run / "straight" / f"{name}.safetensors"))
        resumed = load_file(str(runs / "two" / run / "resumed" / f"{name}.safetensors"))
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), f"{name}:{key}"


@pytest.mark.parametrize("run", RUNS)
def test_code_the_main_process_runs_alone_calls_the_sharded_denoiser_with_the_other_joining(runs, run):
    """``run_on_main_process``: the main process's call gives the images both processes compute together, the other
    process returns None; an exception in the main process's code is raised on both (no process is left waiting)."""
    records = [json.loads((runs / "two" / run / "straight" / f"main_process-{r}.json").read_text()) for r in (0, 1)]
    assert records[0] == {"same_images": True, "raised": "ZeroDivisionError"}
    assert records[1] == {"same_images": None, "raised": "RuntimeError"}


def test_the_gathered_lora_file_gives_the_one_process_images_and_loads_into_the_stock_pipeline(runs):
    """The FLUX LoRA gathered once from the shards, in diffusers' LoRA file format: the one-step pipeline with it
    makes the 1-process run's images, and the stock ``FluxPipeline.load_lora_weights`` takes the file as it is (the
    digits LoRA's gathered weights are compared with the 1-process run's above)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file as load
    from sharded_training_worker import build_generator
    from tiny_teachers import TEACHERS

    images = {}
    for world in ("one", "two"):
        gen = build_generator("flux", lora=False, device="cpu")
        gen.pipeline.load_lora_weights(str(runs / world / "flux-lora" / "straight" / "lora"))
        noise = gen.sample_noise(2, generator=torch.Generator().manual_seed(0))
        cond = gen.sample_conditioning(2, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            images[world] = gen(None, noise, cond)
    assert (images["one"] - images["two"]).abs().max() <= 1e-5 * images["one"].abs().max()
    folder = runs / "two" / "flux-lora" / "straight" / "lora"
    stock = TEACHERS["flux"]()
    stock.load_lora_weights(str(folder))
    (adapter,) = stock.transformer.peft_config  # the name diffusers' loader gave it
    loaded = get_peft_model_state_dict(stock.transformer, adapter_name=adapter)
    saved = {k.removeprefix("transformer."): v for k, v in
             load(str(folder / "pytorch_lora_weights.safetensors")).items()}
    assert loaded.keys() == saved.keys() and saved
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key


def test_the_plans_sharded_figures_match_the_measured_shards_of_the_two_process_run(runs, tmp_path):
    """``fd-onestep plan --fsdp --num_gpus 2`` of the tiny FLUX teacher (under fake tensors) against the local shards
    the 2-process full fine-tune measured: weights and gradients (4 bytes per float32 element), AdamW's state (the
    plan's 8 bytes per trainable element; the run's SGD keeps one momentum buffer per element, sharded the same)."""
    from tiny_teachers import flux_teacher

    from fd_onestep.demos.digits import encoder_path
    from fd_onestep.plan import PlanSettings, make_plan

    torch.manual_seed(0)
    flux_teacher().save_pretrained(tmp_path / "flux")
    plan = make_plan(PlanSettings(teacher=str(tmp_path / "flux"), use_lora=False, mixed_precision="no", num_gpus=2,
                                  fsdp=True, encoders=(str(encoder_path("randcnn-digits")),)), batches=[1, 2])
    planned = plan.sharded(2, 1)
    for rank in (0, 1):
        measured = json.loads((runs / "two" / "flux" / "straight" / f"shards-{rank}.json").read_text())
        for part, value in (("denoiser weights (1/N)", 4 * measured["parameters"]),
                            ("gradients (1/N)", 4 * measured["gradients"]),
                            ("optimizer state (1/N)", 8 * measured["optimizer_state"])):
            assert abs(planned[part] / value - 1) <= 0.15, (part, planned[part], value)
