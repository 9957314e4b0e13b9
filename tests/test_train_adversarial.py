"""The optional adversarial term (``--adv_weight``): a discriminator head on frozen training-encoder features.

Its losses, its head (float32, on the process's device, its own AdamW), its state in every checkpoint so that a
resumed run continues bit for bit, and the early errors of its arguments. Off by default.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import FAST_ARGS, encoder_args, run_script

from fd_onestep.adversarial import FeatureDiscriminator, discriminator_loss, generator_loss
from fd_onestep.images import save_images


# ------------------------------------------------------------------------------------------------ losses, head
def test_hinge_and_nonsaturating_losses_follow_their_formulas():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    assert discriminator_loss(real, fake, "hinge") == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3)
    assert generator_loss(fake, "hinge") == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)
    sp = torch.nn.functional.softplus
    assert discriminator_loss(real, fake, "nonsaturating") == pytest.approx(float(sp(-real).mean() + sp(fake).mean()))
    assert generator_loss(fake, "nonsaturating") == pytest.approx(float(sp(-fake).mean()))
    with pytest.raises(ValueError, match="unknown adversarial loss 'wgan'"):
        generator_loss(fake, "wgan")


def test_the_head_learns_to_tell_real_from_fake_features_and_stays_float32():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(512, 8, generator=g) + 2.0
    head = FeatureDiscriminator(8, real, hidden=16, learning_rate=1e-2, seed=0)
    assert all(p.dtype == torch.float32 for p in head.parameters())
    first = head.discriminator_step(torch.randn(64, 8, generator=g).bfloat16(), g)
    for _ in range(100):
        last = head.discriminator_step(torch.randn(64, 8, generator=g), g)
    assert last < 0.5 * first
    assert head(real[:64]).mean() > head(torch.randn(64, 8, generator=g)).mean()


def test_the_head_state_round_trips_and_its_init_leaves_the_global_random_stream_alone():
    from fd_onestep.training.state import load_state_file, save_state_file

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    real = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    a = FeatureDiscriminator(4, real, hidden=8, seed=5)
    assert torch.equal(torch.rand(3), expected)
    a.discriminator_step(torch.randn(16, 4), torch.Generator().manual_seed(2))
    b = FeatureDiscriminator(4, real, hidden=8, seed=6)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        save_state_file(a.training_state(), Path(tmp) / "d.safetensors")
        b.load_training_state(load_state_file(Path(tmp) / "d.safetensors"))
    fake = torch.randn(16, 4)
    a.discriminator_step(fake, torch.Generator().manual_seed(3))
    b.discriminator_step(fake, torch.Generator().manual_seed(3))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


# ------------------------------------------------------------------------------------------- training script
@pytest.fixture(scope="module")
def real_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real_images")
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.randn(24, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear")
    save_images(torch.tanh(x), folder)
    return folder


def _args(assets, real_images, *extra):
    return ["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets), *FAST_ARGS,
            "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "0",
            "--adv_weight", "0.5", "--adv_encoder", "tiny-siglip", "--adv_real_images", str(real_images),
            "--adv_learning_rate", "1e-3", "--report_to", "tensorboard", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["nonsaturating"])  # the hinge loss: the unit tests above (same code path)
def test_resume_with_the_adversarial_term_continues_bit_identically(assets, real_images, tmp_path, loss):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = _args(assets, real_images, "--adv_loss", loss)
    proc = run_script([*args, "--output_dir", str(straight)])
    assert f"Adversarial term: {loss} loss, weight 0.5, head on tiny-siglip features, 24 real images" in proc.stderr
    run_script([*args, "--output_dir", str(resumed), "--stop_after_steps", "2"])
    run_script([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    for name in ("discriminator.safetensors", "unet/diffusion_pytorch_model.safetensors",
                 "training_state.safetensors", "fd_populations.safetensors"):
        a, b = load_file(str(straight / "checkpoint-4" / name)), load_file(str(resumed / "checkpoint-4" / name))
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs"
    # the head's optimizer state is in the checkpoint (its step count and moments), not only its weights
    assert any(k.startswith("optimizer.state") for k in load_file(str(straight / "checkpoint-4" / "discriminator.safetensors")))
    # the adversarial terms are logged beside the FDs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((straight / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"adv/generator", "adv/discriminator"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_off_by_default_no_discriminator_in_the_checkpoint(assets, tmp_path):
    out = tmp_path / "out"
    run_script(["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets), *FAST_ARGS,
                "--checkpointing_steps", "2", "--output_dir", str(out)])
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-2" / "discriminator.safetensors").exists()
    saved = json.loads((out / "fd_onestep_run_args.json").read_text())["args"]
    assert saved["adv_weight"] == 0.0


@pytest.mark.parametrize("extra,error,message", [
    (["--adv_weight", "0.1"], ValueError,
     "--adv_weight > 0 needs real images for the discriminator: pass --adv_real_images"),
    (["--adv_weight", "-1"], ValueError, "--adv_weight must be a finite number >= 0"),
    (["--adv_weight", "0.1", "--adv_real_images", "/nonexistent-folder"], FileNotFoundError, "is not a folder"),
    (["--adv_weight", "0.1", "--adv_real_images", ".", "--adv_encoder", "tiny-siglip-eval"], ValueError,
     "is not a training encoder"),
])
def test_adversarial_arguments_are_checked_before_any_model_loads(script, assets, tmp_path, extra, error, message):
    with pytest.raises(error, match=re.escape(message)):
        script.parse_args(["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets),
                           "--eval_encoders", assets["encoders"]["siglip_eval"], "--eval_reference_stats",
                           assets["stats"]["siglip_eval"], *FAST_ARGS, "--output_dir", str(tmp_path / "o"), *extra])


def test_the_adversarial_encoder_defaults_to_the_first_training_encoder_and_is_off_by_default(script, assets,
                                                                                             tmp_path):
    common = ["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets), *FAST_ARGS,
              "--output_dir", str(tmp_path / "o")]
    assert script.parse_args(common).adv_weight == 0.0
    assert script.parse_args([*common, "--adv_weight", "0.1", "--adv_real_images", "."]).adv_encoder == "tiny-dinov2"


def _first_step_grad(assets, real_images, out, processes, batch):
    from train_fixtures import accelerate_launch

    dump = out / "grad.safetensors"
    run_script([*_args(assets, real_images), "--output_dir", str(out), "--max_train_steps", "2",
                "--train_batch_size", str(batch), "--checkpointing_steps", "0", "--fd_warmup_samples", "24",
                "--num_validation_samples", "0", "--num_validation_images", "0", "--report_to", "none",
                "--debug_dump_first_step_grad", str(dump), "--debug_float64"],
               launcher=accelerate_launch(processes) if processes > 1 else [])  # one process: plain python
    return load_file(str(dump))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_with_the_adversarial_term_give_the_single_process_gradient(assets, real_images, tmp_path):
    """The head's generator term over the global batch (each process its rows, DDP averaging), and a second
    step after the head's own step, whose gradients are averaged over the processes (on their device)."""
    one = _first_step_grad(assets, real_images, tmp_path / "one", processes=1, batch=8)
    two = _first_step_grad(assets, real_images, tmp_path / "two", processes=2, batch=4)
    flat_one = torch.cat([one[k].double().flatten() for k in sorted(one)])
    flat_two = torch.cat([two[k].double().flatten() for k in sorted(one)])
    relative = float((flat_two - flat_one).norm() / flat_one.norm())
    # float64 networks, the head in float32 (its round-off differs between batch shapes of 4 and 8)
    assert relative <= 1e-5, f"2-process gradient differs from 1-process by {relative:.2e} (relative)"


def test_the_digits_defaults_give_the_discriminator_the_digits_train_split(script, tmp_path):
    from accelerate import PartialState

    from fd_onestep.demos import digits

    PartialState(cpu=True)  # the script's logger (accelerate's) needs the process state
    args = script.parse_args(["--output_dir", str(tmp_path), "--adv_weight", "0.1", "--adv_encoder", "siglip-digits",
                              "--adv_max_real_images", "48"])
    reps = script.build_representations(args, "cpu")
    head = script.build_discriminator(args, None, reps, "cpu")
    encoder = reps.encoders["siglip-digits"]
    with torch.no_grad():
        expected = encoder(digits.load_digits_split("train")[0][:48]).float()
    assert head.real_features.shape == (48, encoder.feature_dim)
    torch.testing.assert_close(head.real_features, expected)
    assert head.real_features.device.type == "cpu" and head.net[0].weight.dtype == torch.float32
