"""The training script sharded (FSDP2) on two gloo processes: the GPU route (``accelerate launch --use_fsdp
--fsdp_version 2``), on CPU.

The bundled digits UNet, full fine-tune, 4 steps of global batch 8: the gathered output weights of the sharded run
equal a one-process run of the same global batch (max relative difference <= 1e-5), a sharded run stopped at step 2
and resumed equals the uninterrupted one bit for bit, and the output folder is a normal diffusers pipeline folder.
"""

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import FAST_ARGS, accelerate_launch, encoder_args, run_script

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _sharded_launch():
    # what a GPU user launches (accelerate refuses --multi_gpu beside --use_fsdp); on CPU, enable_fsdp2 applies it
    return [*(a for a in accelerate_launch(2) if a != "--multi_gpu"), "--use_fsdp", "--fsdp_version", "2"]


def _args(assets, out):
    from fd_onestep.demos.digits import TEACHER_PATH

    return ["--pretrained_model_name_or_path", str(TEACHER_PATH), *encoder_args(assets), *FAST_ARGS,
            "--max_train_steps", "4", "--checkpointing_steps", "0", "--use_ema", "--ema_decay", "0.7",
            "--validation_steps", "0", "--num_validation_images", "0", "--num_validation_samples", "0",
            "--output_dir", str(out)]


def _max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-12))
               for k in a)


def test_sharded_training_equals_one_process_resumes_exactly_and_saves_a_pipeline(assets, tmp_path):
    one, straight, resumed = tmp_path / "one", tmp_path / "straight", tmp_path / "resumed"
    run_script([*_args(assets, one), "--train_batch_size", "8"], launcher=accelerate_launch(1))
    proc = run_script(_args(assets, straight), launcher=_sharded_launch())
    assert "FSDP2: sharding the denoiser over 2 processes" in proc.stderr
    run_script([*_args(assets, resumed), "--stop_after_steps", "2"], launcher=_sharded_launch())
    checkpoint = resumed / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "generator_ema").is_dir()
    proc = run_script([*_args(assets, resumed), "--resume_from_checkpoint", "latest"], launcher=_sharded_launch())
    assert "resumed at step 2" in proc.stderr

    a, b = load_file(str(straight / WEIGHTS)), load_file(str(resumed / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    single = load_file(str(one / WEIGHTS))
    assert _max_relative_difference(single, a) <= 1e-5
    from fd_onestep.demos.digits import TEACHER_PATH

    teacher = load_file(str(TEACHER_PATH / WEIGHTS))
    assert _max_relative_difference(teacher, single) > 1e-4  # training moved the weights far more than the tolerance

    from fd_onestep import FDOneStepPipeline

    pipe = FDOneStepPipeline.from_pretrained(straight)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape[0] == 2 and torch.isfinite(images).all()
