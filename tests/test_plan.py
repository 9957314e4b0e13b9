"""``fd-onestep plan``: the bundled real configs, the plan's arithmetic, its memory and FLOPs against a real CPU run
of the same step, and what each memory saver buys."""

import json
import re
from pathlib import Path

import pytest
import torch

import fd_onestep
from fd_onestep.cli import main
from fd_onestep.demos import digits
from fd_onestep.plan import (
    LiveBytes,
    Plan,
    PlanSettings,
    StepMeasure,
    _NoMemo,
    list_real_configs,
    make_plan,
    real_config_index,
    real_step_in_subprocess,
)

# the teachers the index names (the tiny decoders and encoders are not pipeline folders)
REAL_TEACHERS = sorted(name for name, entry in real_config_index()["configs"].items() if entry["kind"] == "teacher")

REAL_CONFIGS = Path(fd_onestep.__file__).parent / "real_configs"


def digits_settings(**kwargs):
    # the digits-text teacher (a StableDiffusionPipeline) with one bundled encoder: small enough to run for real
    return PlanSettings(teacher=str(digits.TEXT_TEACHER_PATH), encoders=[digits.encoder_spec("dinov2-digits")],
                        mixed_precision="no", use_lora=True, **kwargs)


def test_plan_list_prints_the_bundled_real_configs_one_a_line(capsys):
    assert main(["plan", "--list"]) == 0
    assert capsys.readouterr().out.split() == REAL_TEACHERS


def test_every_bundled_config_names_its_source_and_is_a_pipeline_folder():
    index = real_config_index()["configs"]
    for name in list_real_configs():
        assert index[name]["hub_repo"] and "read_from" in index[name] and "unverified" in index[name]
        model_index = json.loads((REAL_CONFIGS / name / "model_index.json").read_text())
        for component, spec in model_index.items():
            if isinstance(spec, list) and spec[0] and not component.startswith("tokenizer"):
                folder = REAL_CONFIGS / name / component
                assert any(folder.glob("*config.json")), f"{name}/{component} has no config"


def test_plan_without_a_teacher_fails_in_one_line(capsys):
    assert main(["plan"]) == 2
    assert "--teacher is required" in capsys.readouterr().err


def test_live_bytes_counts_allocations_not_views_of_existing_storage():
    weight = torch.zeros(256, 256)  # exists before counting starts, like a model's weights
    with LiveBytes() as live:
        transposed = weight.t()  # a view: no allocation
        assert live.current == 0
        ones = torch.ones(256, 4)
        out = transposed @ ones
        out.add_(1.0)  # in place: no allocation
        assert live.current == out.nbytes + ones.nbytes
        del out
        assert live.current == ones.nbytes
    assert live.peak == 2 * 256 * 4 * 4


def test_fake_outputs_are_freed_when_the_plan_drops_them():
    # the fake mode memoizes every output it wraps; the plan's memo must not keep them alive
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.fake_tensor_converter.meta_converter.tensor_memo = _NoMemo()
    with mode:
        x = torch.empty(1024, 1024)
        with LiveBytes() as live:
            for _ in range(10):
                x = torch.cat([x, x[:1]])  # each output replaces the last (a new shape each time)
    # the input, the output and at most the memo's one entry alive, not all ten outputs
    assert live.peak <= 3 * 1034 * 1024 * 4, live.peak


def synthetic_plan(static_weights=10e9, trainable=1e9, per_sample=5e9, fixed=2e9, use_lora=False):
    settings = PlanSettings(teacher="x", use_lora=use_lora, gpu_memory_gb=80)
    plan = Plan(settings, "sd", 512, {"denoiser": static_weights}, int(trainable), 0)
    for b in (1, 2):
        plan.steps[b] = StepMeasure(b, int(fixed + per_sample * b), {}, {"denoiser": 1e12 * b})
    return plan


def test_largest_batch_is_extrapolated_linearly_from_batches_1_and_2():
    # weights 10 GB + float32 gradients 4 GB + AdamW 8 GB = 22 GB, activations 2 + 5 B GB
    plan = synthetic_plan()
    assert plan.peak(1) == pytest.approx(29e9) and plan.peak(8) == pytest.approx(64e9)
    assert plan.max_batch() == 11  # 22 + 2 + 5 * 11 = 79 <= 80 < 84


def test_fully_sharded_memory_divides_weights_gradients_and_optimizer_state():
    plan = synthetic_plan()
    plan.block_bytes, plan.block_grad_bytes, plan.root_bytes = 1e9, 2e9, 0.5e9
    # weights 10 GB + gradients 4 GB + AdamW 8 GB sharded over 8 GPUs, two blocks' weights and one block's
    # gradients gathered, the root gathered, activations per GPU unchanged
    assert plan.sharded_per_gpu(8, 1) == pytest.approx((10e9 + 4e9 + 8e9) / 8 + 2e9 + 2e9 + 0.5e9 + 7e9)


def test_a_block_gathers_only_the_parameters_no_block_nested_in_it_holds():
    """FSDP2 units nest (SDXL's CrossAttnUpBlock2D holds BasicTransformerBlocks, each a unit of its own): a unit
    gathers its own parameters; the root gathers those in no unit; gradients count trainable parameters only."""
    from fd_onestep.plan import _unit_bytes

    inner = [torch.nn.Linear(4, 4) for _ in range(2)]  # 20 parameters each
    outer = torch.nn.Sequential(torch.nn.Linear(4, 2), *inner)  # 10 of its own
    root = torch.nn.Sequential(torch.nn.Linear(2, 1), outer)  # 3 of its own
    units = [outer, *inner]
    inner[0].weight.requires_grad_(False)
    assert _unit_bytes(outer, units) == 4 * 10 and _unit_bytes(inner[0], units) == 4 * 20
    assert _unit_bytes(root, units) == 4 * 3
    assert _unit_bytes(inner[0], units, trainable_grads=True) == 4 * 4  # its bias only


@pytest.mark.slow
def test_plan_memory_and_flops_match_a_real_cpu_run_of_the_same_step():
    batch = 64
    settings = digits_settings(batch_size=batch)
    planned = make_plan(settings, batches=[batch]).steps[batch]
    real = real_step_in_subprocess(settings, batch)
    # FLOPs: the same operators counted on fake and on real tensors
    assert sum(planned.flops.values()) == sum(real.flops.values())
    # memory: the plan's step peak against the peak the CPU allocator handed out in the real step (the torch
    # profiler's memory events), within 15%; resident memory adds the process's own overheads on top
    assert abs(planned.transient_peak - real.allocated_peak) <= 0.15 * real.allocated_peak, (
        planned.transient_peak, real.allocated_peak)


@pytest.mark.slow
def test_each_saver_lowers_the_planned_decode_memory():
    batch = 16
    base = make_plan(digits_settings(batch_size=batch), batches=[batch]).steps[batch]
    for saver in (dict(vae_gradient_checkpointing=True), dict(decode_micro_batch_size=4),
                  dict(surrogate_decoder=str(digits.TEXT_TEACHER_TINY_DECODER_PATH))):
        saved = make_plan(digits_settings(batch_size=batch, **saver), batches=[batch]).steps[batch]
        assert saved.saved.get("decode (VAE)", 0) < base.saved["decode (VAE)"], saver
        assert saved.transient_peak < base.transient_peak, saver
    # the surrogate adds the tiny decoder's forward and backward, and the full decode runs forward only
    assert "decode (tiny, gradient)" in saved.flops


def test_training_script_builds_the_decode_savers_from_its_flags(tmp_path):
    import importlib.util

    from train_fixtures import SCRIPT

    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

    spec = importlib.util.spec_from_file_location("train_fd_onestep", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(["--embedded_default", "digits-text", "--output_dir", str(tmp_path),
                              "--decode_micro_batch_size", "8", "--vae_gradient_checkpointing",
                              "--surrogate_decoder", str(digits.TEXT_TEACHER_TINY_DECODER_PATH)])
    pipe = FDOneStepPipeline.from_teacher(str(digits.TEXT_TEACHER_PATH))
    savers = script.build_decode_savers(args, pipe)
    assert savers.micro_batch_size == 8 and type(savers.surrogate).__name__ == "AutoencoderTiny"
    assert not any(p.requires_grad for p in savers.surrogate.parameters())
    pixel = FDOneStepPipeline.from_teacher(str(digits.TEACHER_PATH))
    with pytest.raises(ValueError, match="apply to the VAE decode of a latent model"):
        script.build_decode_savers(args, pixel)
    args.surrogate_decoder = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="is not an AutoencoderTiny folder or Hub id"):
        script.build_decode_savers(script.parse_args(["--embedded_default", "digits-text", "--output_dir",
                                                      str(tmp_path), "--surrogate_decoder", str(tmp_path / "missing")]),
                                   pipe)


def test_surrogate_decode_of_the_bundled_tiny_decoder_is_close_to_the_teachers_decode():
    from diffusers import AutoencoderKL

    from fd_onestep.memory_savers import load_surrogate_decoder, vae_decode

    vae = AutoencoderKL.from_pretrained(digits.TEXT_TEACHER_PATH, subfolder="vae")
    tiny = load_surrogate_decoder(str(digits.TEXT_TEACHER_TINY_DECODER_PATH))
    images, _ = digits.load_digits_split("validation")
    with torch.no_grad():
        z = vae.encode(images[:64]).latent_dist.mean * vae.config.scaling_factor
        full, approx = vae_decode(vae, z), vae_decode(tiny, z)
    # the gradient's decoder approximates the teacher's (pixels in [-1, 1]); its value never reaches the loss
    assert torch.nn.functional.mse_loss(approx, full) < 0.01


def _readme_plan_flags() -> list[str]:
    """The flags of the README's `fd-onestep plan` example (the SDXL one), as one list."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"^fd-onestep plan (--pretrained_model_name_or_path sdxl .*?)\n```", text, re.S | re.M).group(1)
    return command.replace("\\\n", " ").split()


def test_plan_and_the_training_script_take_the_same_flags_with_the_same_defaults(script):
    """The README's plan command is a training command's flags: both parsers read them into the same plan
    settings, and the plan's defaults are the trainer's (old plan names stay aliases)."""
    from fd_onestep.cli import build_parser
    from fd_onestep.plan import settings_from_args

    flags = _readme_plan_flags()
    assert "--pretrained_model_name_or_path" in flags and "--use_lora" in flags and "--train_batch_size" in flags
    plan_args = build_parser().parse_args(["plan", *flags])
    train_args = script.parse_args([*flags, "--plan"])
    assert settings_from_args(plan_args) == settings_from_args(train_args)
    old = build_parser().parse_args(["plan", "--teacher", "sdxl", "--batch_size", "8", "--lora", "--encoders", "inception"])
    assert (old.pretrained_model_name_or_path, old.train_batch_size, old.use_lora) == ("sdxl", 8, True)
    plan_parser = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("plan"))
    trainer = script.build_parser()
    # --encoders: the trainer has none (a run names its encoders); the plan assumes the usual two
    assert trainer.get_default("encoders") is None and plan_parser.get_default("encoders") == ["inception", "dinov2"]
    for name in ("train_batch_size", "use_lora", "lora_rank", "mixed_precision", "resolution",
                 "gradient_checkpointing", "vae_gradient_checkpointing", "decode_micro_batch_size", "surrogate_decoder",
                 "encoder_gradient_checkpointing", "gpu_memory_gb", "guidance_scale", "max_sequence_length"):
        assert plan_parser.get_default(name) == trainer.get_default(name), name


def test_the_training_scripts_plan_prints_the_plan_of_the_same_flags(script, capsys, tmp_path):
    """`train_fd_onestep.py --plan` and `fd-onestep plan` with one run's flags print the same figures (the tiny
    digits-text teacher: fake tensors either way, nothing allocated)."""
    flags = ["--pretrained_model_name_or_path", str(digits.TEXT_TEACHER_PATH), "--encoders",
             digits.encoder_spec("dinov2-digits"), "--use_lora", "--train_batch_size", "2", "--mixed_precision", "no"]
    assert main(["plan", *flags]) == 0
    from_cli = capsys.readouterr().out
    script.main(script.parse_args([*flags, "--plan", "--output_dir", str(tmp_path / "never")]))
    from_trainer = capsys.readouterr().out
    assert "step peak" in from_cli and from_cli == from_trainer
    assert not (tmp_path / "never").exists()


def test_the_step_peak_does_not_depend_on_when_the_garbage_collector_runs():
    """Issue 32: `fd-onestep plan` and `train_fd_onestep.py --plan` printed different step peaks for the same flags.
    The FLOP counter's module tracker hooked every module's outputs in reference cycles with their autograd nodes,
    so the tensors those nodes saved were freed only when Python's garbage collector ran, which a process's import
    history decides. With the collector off, every storage of a step must still be freed the moment it is dropped."""
    import gc

    from fd_onestep.plan import _flop_counter

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU())
    x = torch.randn(8, 64)
    for p in model.parameters():  # as the plan does: gradients exist before the step
        p.grad = torch.zeros_like(p)

    def step():
        live = LiveBytes()
        with _flop_counter(), live:
            for _ in range(3):  # each forward's graph dies once its loss is dropped
                model(x).square().sum().backward()
            after = live.current
        return after, live.peak

    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        without_collector = step()
        gc.collect()
    finally:
        if was_enabled:
            gc.enable()
    threshold = gc.get_threshold()
    gc.set_threshold(1, 1, 1)  # a collection at every allocation of a container
    try:
        with_collector = step()
    finally:
        gc.set_threshold(*threshold)
    assert without_collector == with_collector


def test_guidance_and_the_prompt_length_of_the_run_reach_the_plan(tmp_path):
    """--guidance_scale > 1 (true guidance: the negative branch batched with the prompt) doubles the denoiser's
    compute per sample; a longer --max_sequence_length (SD3's T5 tokens in its joint attention) adds to it."""
    from tiny_teachers import TEACHERS

    torch.manual_seed(0)
    TEACHERS["sd3"]().save_pretrained(tmp_path / "sd3")

    def denoiser_flops(**kwargs):
        settings = PlanSettings(teacher=str(tmp_path / "sd3"), encoders=[digits.encoder_spec("dinov2-digits")],
                                mixed_precision="no", use_lora=True, **kwargs)
        return make_plan(settings, batches=[1, 2]).flops_per_sample()["denoiser"]

    short = denoiser_flops(max_sequence_length=16)
    assert denoiser_flops(max_sequence_length=16, guidance_scale=3.0) == pytest.approx(2 * short, rel=1e-6)
    assert denoiser_flops(max_sequence_length=64) > short
