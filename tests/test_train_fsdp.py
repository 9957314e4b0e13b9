"""The training script sharded (FSDP2), and its prompt store.

- Two gloo processes launched the way a GPU user launches (``accelerate launch --use_fsdp --fsdp_version 2``; on CPU
  ``enable_fsdp2`` applies the configuration accelerate drops): the bundled digits UNet, full fine-tune, 4 steps of
  global batch 8. The gathered output weights equal a one-process run of the same global batch (max relative
  difference <= 1e-5, float32 AdamW), a run resumed from its sharded step-2 checkpoint ends bit for bit where
  the uninterrupted one ends, and the output folder is a pipeline ``FDOneStepPipeline`` loads. The same
  run validates, keeps the best weights, writes samples and compares with the teacher (the parts the main process
  runs alone: the other process joins each forward), and dumps the first step's gradient, gathered from the shards.
- The tiny FLUX teacher, LoRA, with the exact population: the gathered LoRA equals the one-process run's and loads
  into the stock pipeline.
- A text-to-image run encodes its prompts once into the store on disk, trains from it with the text encoders off
  the device, and a resumed run reuses the store without encoding.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import FAST_ARGS, accelerate_launch, encoder_args, run_script

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _sharded_launch():
    # accelerate refuses --multi_gpu beside --use_fsdp: the FSDP launch is multi-process by itself
    return [*(a for a in accelerate_launch(2) if a != "--multi_gpu"), "--use_fsdp", "--fsdp_version", "2"]


def _args(assets, out):
    from fd_onestep.demos.digits import TEACHER_PATH

    return ["--pretrained_model_name_or_path", str(TEACHER_PATH), *encoder_args(assets), *FAST_ARGS,
            "--max_train_steps", "4", "--checkpointing_steps", "0", "--use_ema", "--ema_decay", "0.7",
            "--validation_steps", "0", "--num_validation_images", "0", "--num_validation_samples", "0",
            "--output_dir", str(out)]


# validation every 2 steps (grid, fresh-sample FDs, the best weights), samples in chunks of 32 (16 per process) with
# a last chunk of one row, and the teacher comparison: the parts of a run the main process runs alone, or that split
# rows unevenly. None changes the training: the resumed run below, without them, ends bit for bit the same.
MAIN_PROCESS_PARTS = ["--validation_steps", "2", "--num_validation_images", "4", "--num_validation_samples", "16",
                      "--keep_best_by", "fd_mean", "--num_output_samples", "33",
                      "--compare_with_teacher", "--num_comparison_samples", "8"]


def _dump(out):
    return ["--debug_dump_first_step_grad", str(out / "grad.safetensors")]


def _max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-12))
               for k in a)


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_training_equals_one_process_resumes_exactly_and_saves_a_pipeline(assets, tmp_path):
    from fd_onestep import FDOneStepPipeline
    from fd_onestep.demos.digits import TEACHER_PATH

    one, straight, resumed = tmp_path / "one", tmp_path / "straight", tmp_path / "resumed"
    run_script([*_args(assets, one), "--train_batch_size", "8", *_dump(one)], launcher=[])
    proc = run_script([*_args(assets, straight), "--checkpointing_steps", "2", *_dump(straight), *MAIN_PROCESS_PARTS],
                      launcher=_sharded_launch(), timeout=300)
    assert "FSDP2: sharding the denoiser over 2 processes" in proc.stderr
    # accelerate's sharded model and optimizer folders, and the generator EMA sharded the same way
    assert all((straight / "checkpoint-2" / name).is_dir()
               for name in ("pytorch_model_fsdp_0", "optimizer_0", "generator_ema"))
    # a fresh run resumed from its step-2 checkpoint (without the parts above, which change nothing trained)
    proc = run_script([*_args(assets, resumed), "--resume_from_checkpoint", str(straight / "checkpoint-2")],
                      launcher=_sharded_launch())
    assert "resumed at step 2" in proc.stderr

    # the first step's gradient, gathered from the shards, is the one process's gradient of the global batch
    # (relative to the whole gradient's norm: some, e.g. attention key biases, are zero up to round-off)
    g1, g2 = load_file(str(one / "grad.safetensors")), load_file(str(straight / "grad.safetensors"))
    assert g1.keys() == g2.keys() and g1
    v1, v2 = (torch.cat([g[k].double().flatten() for k in sorted(g1)]) for g in (g1, g2))
    assert float((v1 - v2).norm() / v1.norm()) <= 1e-5
    # what the main process runs alone, the other process joining each forward of the sharded denoiser
    assert (straight / "validation" / "grid_000002.png").is_file() and (straight / "validation_grid.png").is_file()
    assert (straight / "best" / "fd_onestep_best.json").is_file() and (straight / "comparison.md").is_file()
    assert len(list((straight / "samples").rglob("*.png"))) == 33  # 32 + 1: a last chunk one process has no row of

    a, b = load_file(str(straight / WEIGHTS)), load_file(str(resumed / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    single = load_file(str(one / WEIGHTS))
    assert all(t.dtype == torch.float32 for t in single.values())
    assert _max_relative_difference(single, a) <= 1e-5
    teacher = load_file(str(TEACHER_PATH / WEIGHTS))
    assert _max_relative_difference(teacher, single) > 1e-3  # training moved the weights far more than the tolerance

    pipe = FDOneStepPipeline.from_pretrained(straight)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape[0] == 2 and torch.isfinite(images).all()


def test_a_text_run_encodes_its_prompts_once_and_trains_with_the_text_encoders_off_the_device(
        script, tmp_path, monkeypatch):
    """The trainer's ``build_generator`` on the digits-text teacher: the store is built, the text encoders are taken
    off the device (here: to the meta device, so any later use of them would fail) after the generator is built, the
    generator draws its conditioning from the store; a resumed run's build encodes nothing."""
    from accelerate import Accelerator

    import fd_onestep.prompt_store as prompt_store
    from fd_onestep.demos.digits import TEXT_TEACHER_PATH
    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

    prompts = ["the digit three", "a 7", "the digit three", "a handwritten five"]
    stats = tmp_path / "stats.safetensors"  # parse_args checks it exists; build_generator never reads it
    stats.touch()
    args = script.parse_args(["--pretrained_model_name_or_path", str(TEXT_TEACHER_PATH), "--encoders", "x",
                              "--reference_stats", str(stats), "--output_dir", str(tmp_path / "run")])
    offload = prompt_store.offload_text_encoders
    monkeypatch.setattr(prompt_store, "offload_text_encoders", lambda pipe: offload(pipe, device="meta"))
    accelerator = Accelerator(cpu=True)
    encoded = []

    def build(encode_fails=False):
        pipe = FDOneStepPipeline.from_teacher(str(TEXT_TEACHER_PATH), local_files_only=True)
        encode = pipe.encode_conditioning
        monkeypatch.setattr(pipe, "encode_conditioning", lambda prompt, **kw: encoded.append(prompt) or encode(
            prompt=prompt, **kw))
        gen, _ = script.build_generator(args, pipe, None, prompts, None, None, accelerator)
        return pipe, gen

    pipe, gen = build()
    assert sorted(p for chunk in encoded for p in chunk) == sorted(set(prompts))  # each distinct prompt once
    assert (tmp_path / "run" / "prompt_embeddings" / prompt_store.PROMPT_STORE_MANIFEST).is_file()
    assert all(p.device.type == "meta" for p in pipe.text_encoder.parameters())
    cond = gen.sample_conditioning(4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(cond.prompt_embeds).all() and cond.prompt_embeds.device.type == "cpu"

    encoded.clear()
    build()  # the resumed run: same prompts, same text encoders
    assert encoded == []


@pytest.mark.slow
@pytest.mark.distributed
def test_a_sharded_lora_run_of_flux_with_the_exact_population_gives_the_one_process_lora(assets, tmp_path):
    """The tiny FLUX teacher, LoRA, the exact two-pass population (2 micro-batches, FSDP2's gradient sync off on the
    first): 2 sharded processes train the 1-process run's LoRA (same global batch), its file loads into the stock
    ``FluxPipeline``, which then takes the 1-process run's one step."""
    from diffusers import DiffusionPipeline
    from tiny_teachers import flux_teacher

    from fd_onestep import FDOneStepPipeline

    torch.manual_seed(0)
    flux_teacher().save_pretrained(tmp_path / "flux")

    def args(out, batch):
        return ["--pretrained_model_name_or_path", str(tmp_path / "flux"), "--prompts_file", assets["prompts_file"],
                *encoder_args(assets), *FAST_ARGS, "--max_train_steps", "2", "--learning_rate", "1e-3",
                "--train_batch_size", str(batch), "--use_lora", "--lora_rank", "4", "--fd_population", "exact",
                "--fd_micro_batches", "2", "--checkpointing_steps", "0", "--validation_steps", "0",
                "--num_validation_images", "0", "--num_validation_samples", "0", "--resolution", "32",
                # float64: compares the algorithm, not the round-off of different batch shapes that AdamW's
                # normalized steps carry into a LoRA starting from zero
                "--debug_float64", "--output_dir", str(out)]

    run_script(args(tmp_path / "one", 4), launcher=[])
    assert "FSDP2: sharding the denoiser" in run_script(args(tmp_path / "two", 2), launcher=_sharded_launch()).stderr
    lora = "pytorch_lora_weights.safetensors"
    one, two = load_file(str(tmp_path / "one" / lora)), load_file(str(tmp_path / "two" / lora))
    assert _max_relative_difference(one, two) <= 1e-5
    assert max(float(t.abs().max()) for k, t in one.items() if "lora_B" in k) > 1e-3  # B starts at zero: trained

    images = {}
    for run in ("one", "two"):
        info = json.loads((tmp_path / run / "fd_onestep_lora.json").read_text())
        recipe = FDOneStepPipeline.from_teacher(info["base_model"], **info["one_step_settings"]).stock_one_step()
        stock = DiffusionPipeline.from_pretrained(tmp_path / "flux")
        stock.set_progress_bar_config(disable=True)
        stock.load_lora_weights(tmp_path / run)  # FluxPipeline's own loader takes the gathered file as it is
        stock.scheduler = recipe["scheduler"]
        images[run] = stock(prompt=["a red square", "a green cat"], generator=torch.Generator().manual_seed(1),
                            output_type="pt", **recipe["call_kwargs"]).images
    assert type(stock).__name__ == "FluxPipeline"
    assert (images["one"] - images["two"]).abs().max() <= 1e-4
