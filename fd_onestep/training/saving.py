"""The run's output weights: the whole one-step pipeline or the LoRA with its base-model info, written atomically
(``DIR/best``), and the final choice between the last and the best weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from accelerate.logging import get_logger

logger = get_logger(__name__, log_level="INFO")


def stock_recipe_of(pipe) -> dict | None:
    """The stock diffusers pipeline's one step equal to ``pipe``'s (``stock_one_step``), JSON-able; None where
    there is none (tanh output bound, class-conditional models, DiT)."""
    try:
        recipe = pipe.stock_one_step()
    except ValueError:
        return None
    return {"pipeline": recipe["pipeline"], "scheduler": type(recipe["scheduler"]).__name__,
            "scheduler_overrides": recipe["scheduler_overrides"], "call_kwargs": recipe["call_kwargs"]}


def lora_base_info(args, pipe) -> dict:
    from fd_onestep.evaluation import lora_loading_code

    info = {
        "base_model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "variant": args.variant,
        "one_step_settings": {k: pipe.config[k] for k in ("timestep", "prediction_type", "guidance_scale",
                                                          "output_bound", "sample_size", "max_sequence_length")},
        "how_to_load": lora_loading_code(args.output_dir),
    }
    recipe = stock_recipe_of(pipe) if pipe.is_text_conditional else None
    if recipe is not None:  # the LCM-LoRA / TCD way: the stock pipeline with a one-step scheduler
        info["stock_pipeline"] = recipe
    return info


def gather_weights(args, model):
    """A sharded (FSDP2) ``model``'s weights gathered on the main process's CPU for :func:`save_weights`: a plain
    unsharded denoiser (full fine-tune) or the LoRA's state dict; None on the other processes and for a model that
    is not sharded. A collective: call on every process."""
    from fd_onestep.training.sharding import full_state_dict, is_sharded, sharded_lora_state_dict, unsharded_denoiser

    if not is_sharded(model):
        return None
    if args.use_lora:
        return sharded_lora_state_dict(model) or None
    state = full_state_dict(model)
    return unsharded_denoiser(model, state) if state else None


def save_weights(args, gen, model, folder: Path, gathered=None) -> None:
    """The generator ``model`` into ``folder``: the LoRA + its base-model info with --use_lora, else the whole
    one-step pipeline. Callers swap in the EMA weights first (:func:`ema_weights`). ``gathered``: a sharded model's
    weights from :func:`gather_weights`, written instead of ``model``'s."""
    if args.use_lora:
        from fd_onestep.evaluation import LORA_INFO_FILE
        from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline
        from fd_onestep.training.sharding import _plain_module

        if gathered is None:
            gen.save_lora(folder, denoiser=model)
        else:
            FDOneStepPipeline.save_lora_weights(folder, denoiser_lora_layers=gathered, family=gen.family,
                                                lora_config=_plain_module(model).peft_config["default"])
        (folder / LORA_INFO_FILE).write_text(json.dumps(lora_base_info(args, gen.pipeline), indent=2))
    else:
        gen.save_pipeline(folder, denoiser=gathered if gathered is not None else model)


def save_weights_atomically(args, gen, model, target: Path, gathered=None) -> None:
    """Main process: :func:`save_weights` into ``target`` (a sharded model: its ``gathered`` weights), replacing
    it only once the new folder is complete."""
    tmp = target.with_name(f".{target.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_weights(args, gen, model, tmp, gathered)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


def save_final_weights(args, accelerator, gen, model, progress) -> dict:
    """The output dir's pipeline (or LoRA): the last weights, or with ``--final_weights best`` the best ones."""
    output_dir = Path(args.output_dir)
    best_dir = output_dir / "best"
    use_best = args.final_weights == "best" and progress.best_step is not None and best_dir.is_dir()
    gathered = None if use_best else gather_weights(args, model)  # a sharded model: every process takes part
    if accelerator.is_main_process:
        if use_best:
            logger.info(f"--final_weights best: the output pipeline is the step-{progress.best_step} one "
                        f"({args.keep_best_by} = {progress.best_metric:.4g}).")
            for entry in best_dir.iterdir():
                target = output_dir / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, target)
        else:
            save_weights(args, gen, model, output_dir, gathered)
    accelerator.wait_for_everyone()
    return {"which": "best" if use_best else "last", "step": progress.best_step if use_best else progress.global_step}
