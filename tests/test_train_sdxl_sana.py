"""The training script on tiny SDXL and SANA teachers: LoRA and full fine-tune from prompts (a text file, a datasets
caption column), an interrupted run resumes exactly, and the model card's code runs as written. The script's
``main`` runs in-process (as in test_train_errors_and_push.py)."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import FAST_ARGS, encoder_args

from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:ill-conditioned one-step map")]


def _train(script, assets, family, out, *extra):
    prompts = (["--prompts_file", assets["prompts_file"]] if family == "sdxl"
               else ["--dataset_name", assets["captions_dataset"], "--caption_column", "text"])
    argv = ["--pretrained_model_name_or_path", assets["teachers"][family], *encoder_args(assets),
            "--output_dir", str(out), *FAST_ARGS, "--train_batch_size", "2", "--fd_warmup_samples", "4",
            "--sample_batch_size", "4", "--num_validation_images", "2", "--num_validation_samples", "4",
            "--fd_population", "ema", "--fd_ema_beta", "0.5", "--checkpointing_steps", "1", *prompts,
            *(["--onestep_timestep", "500"] if family == "sdxl" else []), *extra]
    return script.main(script.parse_args(argv))


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _run_card_code(out):
    """Every snippet of the run's model card, exactly as rendered; returns their namespaces."""
    spaces = []
    for block in _python_blocks((out / "README.md").read_text()):
        namespace = {}
        exec(compile(block, "<model card snippet>", "exec"), namespace)
        spaces.append(namespace)
    return spaces


def _same_tensors(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{a.name}:{key} differs"


def train_straight_and_resumed(train, tmp_path, extra, weights):
    """A 2-step run (``train(out, *args)``) straight, and stopped after step 1 then resumed from ``latest``: both end
    with bitwise-equal ``weights`` (a file of the output dir) and checkpoint-2 states. Returns both output dirs."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *extra)
    train(resumed, *extra, "--stop_after_steps", "1")
    assert train(resumed, *extra, "--resume_from_checkpoint", "latest")["global_step"] == 2
    _same_tensors(straight / weights, resumed / weights)
    for name in ("fd_populations.safetensors", "training_state.safetensors"):
        _same_tensors(straight / "checkpoint-2" / name, resumed / "checkpoint-2" / name)
    return straight, resumed


@pytest.mark.parametrize("family,lora", [("sdxl", True), ("sana", False)], ids=["sdxl-lora", "sana-full"])
def test_an_interrupted_run_resumes_exactly_and_its_card_code_runs(script, assets, tmp_path, family, lora):
    extra = ["--use_lora", "--lora_rank", "2"] if lora else []
    slot = "unet" if family == "sdxl" else "transformer"
    weights = "pytorch_lora_weights.safetensors" if lora else f"{slot}/diffusion_pytorch_model.safetensors"
    straight, _ = train_straight_and_resumed(lambda out, *args: _train(script, assets, family, out, *args), tmp_path,
                                             extra, weights)

    spaces = _run_card_code(straight)
    if lora:
        # ours (the teacher + the LoRA, with the run's one-step settings) and the stock pipeline's one step
        assert len(spaces) == 2 and type(spaces[1]["pipe"]).__name__ == "StableDiffusionXLPipeline"
        info = json.loads((straight / "fd_onestep_lora.json").read_text())
        assert info["stock_pipeline"]["pipeline"] == "StableDiffusionXLPipeline"
        pipe = FDOneStepPipeline.from_teacher(info["base_model"], **info["one_step_settings"])
        pipe.load_lora_weights(straight)
        recipe, stock = pipe.stock_one_step(), spaces[1]["pipe"]
        ours = pipe("a red square", generator=torch.Generator().manual_seed(2), output_type="pt").images
        theirs = stock("a red square", generator=torch.Generator().manual_seed(2), output_type="pt",
                       **recipe["call_kwargs"]).images
        assert (ours - theirs).abs().max() <= 1e-4
    else:
        # the pipeline folder with fd-onestep, and without it (the pipeline file travels with the folder)
        assert len(spaces) == 2 and type(spaces[1]["pipe"]).__name__ == "FDOneStepPipeline"
        for space in spaces:  # the card's call is unseeded: each gives one 32x32 image
            assert np.asarray(space["images"]).shape == (32, 32, 3)
        assert FDOneStepPipeline.from_pretrained(straight).family == "sana"


@pytest.mark.parametrize("family,lora", [("sdxl", False), ("sana", True)], ids=["sdxl-full", "sana-lora"])
def test_the_other_way_of_training_each_family(script, assets, tmp_path, family, lora):
    out = tmp_path / "out"
    _train(script, assets, family, out, *(["--use_lora", "--lora_rank", "2"] if lora else []))
    if lora:
        pipe = FDOneStepPipeline.from_teacher(assets["teachers"][family])
        pipe.load_lora_weights(out)
        assert any("lora" in n for n, _ in pipe.denoiser.named_parameters())
        info = json.loads((out / "fd_onestep_lora.json").read_text())
        assert info["stock_pipeline"]["pipeline"] == "SanaPipeline"
        spaces = _run_card_code(out)  # ours and SanaPipeline with the LoRA and the flow-matching Euler step
        assert type(spaces[1]["pipe"]).__name__ == "SanaPipeline"
    else:
        pipe = FDOneStepPipeline.from_pretrained(out)
        assert pipe.family == "sdxl" and pipe.config.timestep == 500
        images = pipe(["two cats"], generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
        _run_card_code(out)
