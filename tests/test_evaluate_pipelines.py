"""`fd-onestep evaluate --pipeline DIR` loads what the training script writes: a full FDOneStepPipeline folder
and a LoRA folder (pytorch_lora_weights.safetensors + fd_onestep_lora.json), besides stock diffusers pipelines."""

from __future__ import annotations

import json

import pytest
import torch
from test_lora_fd_onestep import trained_lora
from test_pipeline_tiny_models import ddpm_teacher

from fd_onestep.cli import main
from fd_onestep.dataset_stats import compute_reference_stats, resolve_encoders, save_reference_stats
from fd_onestep.evaluation import LORA_INFO_FILE, evaluate_pipeline, load_pipeline
from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

ENCODER = "pixels-gray:8"
# non-default one-step settings: a LoRA loaded over the default ones would be another generator
LORA_SETTINGS = {"timestep": 600, "output_bound": "tanh"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    torch.manual_seed(0)
    ddpm_teacher().save_pretrained(root / "teacher")
    teacher = str(root / "teacher")

    torch.manual_seed(1)
    full = FDOneStepPipeline.from_teacher(teacher)
    with torch.no_grad():  # a "trained" generator: not the teacher's weights
        for param in full.denoiser.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    full.save_pretrained(root / "onestep")

    lora = trained_lora(FDOneStepPipeline.from_teacher(teacher, **LORA_SETTINGS))
    lora.save_lora(root / "lora")
    # what train_fd_onestep.py's lora_base_info writes
    info = {"base_model": teacher, "revision": None, "variant": None,
            "one_step_settings": {k: lora.config[k] for k in ("timestep", "prediction_type", "guidance_scale",
                                                              "output_bound", "sample_size")}}
    (root / "lora" / LORA_INFO_FILE).write_text(json.dumps(info))

    encoders = resolve_encoders([ENCODER])
    real = torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    references = compute_reference_stats(encoders, images=real, show_progress=False)
    (stats,) = save_reference_stats(references, root / "stats").values()
    return {"root": root, "teacher": teacher, "encoders": encoders, "references": references, "stats": str(stats)}


def _cli_fd(folders, pipeline_dir, tmp_path) -> float:
    out = tmp_path / "result.json"
    assert main(["evaluate", "--pipeline", str(pipeline_dir), "--encoders", ENCODER, "--reference_stats",
                 folders["stats"], "--num_samples", "6", "--batch_size", "3", "--seed", "5", "--output", str(out)]) == 0
    (rep,) = json.loads(out.read_text())["representations"].values()
    return rep["fd"]


def _fd(folders, pipe) -> float:
    pipe.set_progress_bar_config(disable=True)
    result = evaluate_pipeline(pipe, folders["encoders"], folders["references"], 6, batch_size=3, seed=5,
                               show_progress=False)
    (rep,) = result.representations.values()
    return rep.fd


def test_a_saved_one_step_pipeline_folder_is_evaluated_as_fd_onestep_pipeline(folders, tmp_path):
    directory = folders["root"] / "onestep"
    assert type(load_pipeline(directory)) is FDOneStepPipeline
    assert _cli_fd(folders, directory, tmp_path) == _fd(folders, FDOneStepPipeline.from_pretrained(directory))


def test_a_lora_folder_is_evaluated_over_its_base_model_with_its_one_step_settings(folders, tmp_path):
    directory = folders["root"] / "lora"
    loaded = load_pipeline(directory)
    assert type(loaded) is FDOneStepPipeline
    assert all(loaded.config[k] == v for k, v in LORA_SETTINGS.items())

    expected = FDOneStepPipeline.from_teacher(folders["teacher"], **LORA_SETTINGS)
    expected.load_lora_weights(directory)
    fd = _cli_fd(folders, directory, tmp_path)
    assert fd == _fd(folders, expected)
    without_lora = _fd(folders, FDOneStepPipeline.from_teacher(folders["teacher"], **LORA_SETTINGS))
    assert fd != without_lora  # the LoRA was loaded


def test_a_stock_pipeline_still_loads_with_diffusers(folders):
    assert type(load_pipeline(folders["teacher"])).__name__ == "DDPMPipeline"


def test_a_lora_folder_whose_base_model_is_missing_names_it(folders, tmp_path, capsys):
    directory = tmp_path / "lora"
    directory.mkdir()
    for name in ("pytorch_lora_weights.safetensors", LORA_INFO_FILE):
        (directory / name).write_bytes((folders["root"] / "lora" / name).read_bytes())
    info = json.loads((directory / LORA_INFO_FILE).read_text())
    (directory / LORA_INFO_FILE).write_text(json.dumps({**info, "base_model": str(tmp_path / "gone")}))
    code = main(["evaluate", "--pipeline", str(directory), "--encoders", ENCODER, "--reference_stats", folders["stats"]])
    assert code == 2
    err = capsys.readouterr().err
    assert f"base model '{tmp_path / 'gone'}'" in err and LORA_INFO_FILE in err

    (directory / LORA_INFO_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {LORA_INFO_FILE} naming its base model"):
        load_pipeline(directory)
