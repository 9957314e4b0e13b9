"""Messages that name the problem and the fix, and numbers that carry their context: an impossible output
folder, a pipeline folder missing a component, evaluate on unreadable images and on a text pipeline without
prompts, what evaluate records, a LoRA that does not fit, the fresh-FD warning only where it means something,
sample counts in the summary and the model card, and written files that honour the umask."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image
from test_evaluate_pipelines import ENCODER, folders  # noqa: F401 - the fixture
from train_fixtures import FAST_ARGS, encoder_args

from fd_onestep.cli import main as cli


def _args(assets, out, *extra):
    return ["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets),
            "--output_dir", str(out), *FAST_ARGS, *extra]


def test_an_output_dir_under_a_file_is_an_early_error_naming_it(script, assets, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=f"--output_dir '{blocker}/runs/out' cannot be created: '{blocker}' is a file"):
        script.parse_args(_args(assets, blocker / "runs" / "out"))


def test_a_pipeline_folder_missing_its_vae_names_the_component(assets, tmp_path):
    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

    folder = tmp_path / "sd"
    shutil.copytree(assets["teachers"]["sd"], folder)
    shutil.rmtree(folder / "vae")
    for load in (FDOneStepPipeline.from_pretrained, FDOneStepPipeline.from_teacher):
        with pytest.raises(FileNotFoundError, match=f"lists the component 'vae' \\(AutoencoderKL\\) but there is no "
                                                     f"{folder / 'vae'} folder"):
            load(str(folder))


def test_evaluate_on_a_truncated_png_advises_a_flag_evaluate_has(folders, tmp_path, capsys):  # noqa: F811
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("L", (16, 16), color=40 * i).save(images / f"{i}.png")
    data = (images / "3.png").read_bytes()
    (images / "3.png").write_bytes(data[: len(data) // 2])
    argv = ["evaluate", "--images", str(images), "--encoders", ENCODER, "--reference_stats", folders["stats"]]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "3.png" in err and "--skip_unreadable_images" in err
    out = tmp_path / "result.json"
    assert cli([*argv, "--skip_unreadable_images", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_samples"] == 3 and result["metadata"]["skipped_unreadable_images"] == "1"
    assert "1 unreadable image(s) skipped; 3 evaluated" in capsys.readouterr().out


def test_evaluate_on_a_text_pipeline_without_prompts_names_prompts_file(assets, tmp_path, capsys):
    from fd_onestep.dataset_stats import compute_reference_stats, resolve_encoders, save_reference_stats

    encoders = resolve_encoders(["pixels:8"])
    real = torch.rand(20, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    (stats,) = save_reference_stats(compute_reference_stats(encoders, images=real, show_progress=False),
                                    tmp_path / "stats").values()
    code = cli(["evaluate", "--pipeline", assets["teachers"]["sd"], "--encoders", "pixels:8",
                "--reference_stats", str(stats), "--num_samples", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "is a text-to-image pipeline: pass prompts with --prompts_file" in err
    out = tmp_path / "result.json"
    assert cli(["evaluate", "--pipeline", assets["teachers"]["sd"], "--encoders", "pixels:8", "--reference_stats",
                str(stats), "--num_samples", "2", "--prompts_file", assets["prompts_file"], "--pipeline_kwargs",
                '{"num_inference_steps": 1}', "--output", str(out)]) == 0
    metadata = json.loads(out.read_text())["metadata"]  # what was evaluated: the pipeline and its prompts
    assert metadata["source"] == assets["teachers"]["sd"] and metadata["prompts_file"] == assets["prompts_file"]
    assert metadata["num_prompts"] == "3"


def test_evaluate_records_the_lora_and_its_base_model(folders, tmp_path):  # noqa: F811
    out = tmp_path / "result.json"
    lora = str(folders["root"] / "lora")
    assert cli(["evaluate", "--pipeline", lora, "--encoders", ENCODER, "--reference_stats", folders["stats"],
                "--num_samples", "4", "--batch_size", "2", "--output", str(out)]) == 0
    metadata = json.loads(out.read_text())["metadata"]
    assert metadata["source"] == lora and metadata["lora"] == lora
    assert metadata["base_model"] == folders["teacher"]


def test_a_lora_that_does_not_fit_leaves_no_adapter_attached(folders, tmp_path):  # noqa: F811
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

    wide = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)
    DDPMPipeline(unet=wide, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "wide")
    pipe = FDOneStepPipeline.from_teacher(str(tmp_path / "wide"))
    before = {k: v.clone() for k, v in pipe.denoiser.state_dict().items()}
    with pytest.raises(ValueError, match="this LoRA does not fit the unet"):
        pipe.load_lora_weights(str(folders["root"] / "lora"))
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.denoiser.modules())
    after = pipe.denoiser.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_the_fresh_fd_warning_needs_enough_samples_and_states_their_number(script, assets, tmp_path, caplog):
    """The tiny encoders have d = 16: 16 fresh samples cannot tell lag from small-sample bias, 32 can."""
    for samples, warns in (("16", False), ("32", True)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            script.main(script.parse_args(_args(assets, tmp_path / samples, "--num_validation_samples", samples,
                                                "--fresh_fd_warning_ratio", "0")))
        assert ("x the population FD" in caplog.text) is warns, samples
        if warns:
            assert f"({samples} samples)" in caplog.text


def test_summary_and_model_card_state_the_sample_counts(script, assets, tmp_path):
    out = tmp_path / "out"
    script.main(script.parse_args(_args(assets, out)))
    summary = json.loads((out / "fd_onestep_summary.json").read_text())
    assert summary["final_validation"]["num_samples"] == 16
    assert "measured on\n16 newly generated samples" in (out / "README.md").read_text()


def test_written_weights_and_checkpoints_honour_the_umask(script, assets, tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "out"
        script.main(script.parse_args(_args(assets, out, "--checkpointing_steps", "1")))
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes["unet/diffusion_pytorch_model.safetensors"] == 0o644
    assert modes["checkpoint-1/fd_populations.safetensors"] == 0o644
    assert set(modes.values()) == {0o644}, {k: oct(v) for k, v in modes.items() if v != 0o644}


def test_a_stats_glob_that_picks_up_per_class_files_still_evaluates(assets, tmp_path, caplog):
    """README: `--reference_stats stats/*.safetensors`, with `stats --label_column` files in the folder."""
    from pathlib import Path

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), color=(60 * i, 20, 200 - 40 * i)).save(images / f"{i}.png")
    stats = sorted(str(p) for p in Path(assets["stats"]["dinov2"]).parent.glob("*.safetensors"))
    assert any(p.endswith(".classes.safetensors") for p in stats)
    out = tmp_path / "result.json"
    with caplog.at_level("WARNING"):
        code = cli(["evaluate", "--images", str(images), "--encoders", assets["encoders"]["dinov2"],
                    "--reference_stats", *stats, "--output", str(out)])
    assert code == 0 and json.loads(out.read_text())["num_samples"] == 4
    assert "left out the per-class statistics" in caplog.text and "--class_stats" in caplog.text
