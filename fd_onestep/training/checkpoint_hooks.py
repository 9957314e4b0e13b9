"""Resumable checkpoints through accelerate's save/load state hooks: the denoiser (or its LoRA) in diffusers
format, the FD populations, the generator EMA, the discriminator head, the sampling RNG and the progress, all as
safetensors; loading a damaged checkpoint is a :class:`RunError` naming it.

Sharded (FSDP2) runs: accelerate itself writes and reads the denoiser and optimizer as sharded
``torch.distributed.checkpoint`` folders (``pytorch_model_fsdp_0/``, ``optimizer_0/``), every process its own
shards, and passes the hooks no model; the generator EMA, whose shadow weights are sharded like the denoiser's, is
written and read the same way (``generator_ema/``) by every process."""

from __future__ import annotations

from pathlib import Path

from accelerate.logging import get_logger

from fd_onestep.errors import RunError
from fd_onestep.training.checkpoints import prune_checkpoints, save_checkpoint_atomically
from fd_onestep.training.generation import unwrap
from fd_onestep.training.output_dir import honour_umask
from fd_onestep.training.run_args import fingerprint_digest, write_run_args
from fd_onestep.training.state import load_state_file, save_state_file

logger = get_logger(__name__, log_level="INFO")


# Checkpoints: everything as safetensors (+ JSON), through accelerate's save/load state hooks
def register_checkpoint_hooks(accelerator, args, gen, fd_loss, ema, sampling_rng, progress, fingerprint,
                              discriminator=None, sharded=False):
    from fd_onestep.training.sharding import load_sharded_state, save_sharded_state

    slot = gen.pipeline.denoiser_slot

    def save_model_hook(models, weights, ckpt_dir):
        ckpt_dir = Path(ckpt_dir)
        if sharded and ema is not None:  # a collective: every process writes its shards
            save_sharded_state(ema.state_dict(), ckpt_dir / "generator_ema")
        if accelerator.is_main_process:
            for model in ([] if sharded else models):
                model = unwrap(accelerator, model)
                if args.use_lora:
                    gen.save_lora(ckpt_dir / f"{slot}_lora", denoiser=model)
                else:
                    model.save_pretrained(ckpt_dir / slot)
            save_state_file({name: loss.population.state_dict() for name, loss in fd_loss.losses.items()},
                            ckpt_dir / "fd_populations.safetensors")
            if ema is not None and not sharded:
                save_state_file(ema.state_dict(), ckpt_dir / "generator_ema.safetensors")
            if discriminator is not None:
                save_state_file(discriminator.training_state(), ckpt_dir / "discriminator.safetensors")
            save_state_file({"sampling_rng": sampling_rng.state_dict(), "progress": progress.state_dict()},
                            ckpt_dir / "training_state.safetensors")
            write_run_args(ckpt_dir, args, fingerprint)
        while weights:
            weights.pop()  # the denoiser is saved above in diffusers format, not as model.safetensors

    def load_model_hook(models, ckpt_dir):
        ckpt_dir = Path(ckpt_dir)
        while models:
            model = unwrap(accelerator, models.pop())
            if args.use_lora:
                from peft import set_peft_model_state_dict
                from safetensors.torch import load_file

                lora_file = ckpt_dir / f"{slot}_lora" / "pytorch_lora_weights.safetensors"
                saved = load_file(str(lora_file))
                state = {k[len(slot) + 1:]: v for k, v in saved.items() if k.startswith(slot + ".")}
                if not state:
                    prefixes = sorted({k.split(".", 1)[0] for k in saved})
                    raise RuntimeError(
                        f"checkpoint LoRA {lora_file} holds no weights for the {slot!r} component (its keys start "
                        f"with {prefixes}): it belongs to another model. Resume from a checkpoint of this run, or "
                        "start a new run in a fresh --output_dir."
                    )
                result = set_peft_model_state_dict(model, state, adapter_name="default")
                unexpected = [k for k in (getattr(result, "unexpected_keys", None) or []) if "lora_" in k]
                missing = [k for k in (getattr(result, "missing_keys", None) or []) if "lora_" in k]
                if unexpected or missing:
                    raise RuntimeError(
                        f"checkpoint LoRA {lora_file} does not match the model's LoRA: "
                        + (f"unexpected keys {unexpected[:5]} " if unexpected else "")
                        + (f"missing keys {missing[:5]} ({len(missing)} in all) " if missing else "")
                        + "(another --lora_rank / --lora_target_modules, or a damaged checkpoint). Resume with the "
                        "run's own arguments and checkpoint, or start a new run in a fresh --output_dir."
                    )
            else:
                loaded = type(model).from_pretrained(ckpt_dir / slot)
                model.load_state_dict(loaded.state_dict())
                del loaded
        pop_states = load_state_file(ckpt_dir / "fd_populations.safetensors")
        for name, loss in fd_loss.losses.items():
            loss.population.load_state_dict(pop_states[name])
        if ema is not None and sharded:
            ema.load_state_dict(load_sharded_state(ema.state_dict(), ckpt_dir / "generator_ema"))
        elif ema is not None:
            ema.load_state_dict(load_state_file(ckpt_dir / "generator_ema.safetensors"))
            ema.to(accelerator.device)
        if discriminator is not None:
            discriminator.load_training_state(load_state_file(ckpt_dir / "discriminator.safetensors"))
        state = load_state_file(ckpt_dir / "training_state.safetensors")
        sampling_rng.load_state_dict(state["sampling_rng"])
        progress.load_state_dict(state["progress"])

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def load_checkpoint(accelerator, path) -> None:
    """``accelerator.load_state``; a file that cannot be read is a :class:`RunError` naming the checkpoint."""
    import pickle

    from safetensors import SafetensorError

    try:
        accelerator.load_state(str(path))
    except RunError:
        raise
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError) as err:
        raise RunError(
            f"could not load checkpoint {str(path)!r} ({type(err).__name__}: {err}): a damaged checkpoint. Resume "
            "from another one (--resume_from_checkpoint checkpoint-<step>, or 'latest' after deleting this one)."
        ) from err


def save_checkpoint(accelerator, args, step, fingerprint):
    path = save_checkpoint_atomically(accelerator, args.output_dir, step,
                                      {"fingerprint_digest": fingerprint_digest(fingerprint)})
    if accelerator.is_main_process:
        honour_umask(path)
        prune_checkpoints(args.output_dir, args.checkpoints_total_limit, protect=[path])
    logger.info(f"Saved state to {path}")
