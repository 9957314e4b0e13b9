"""Early, clear errors of the training script (before any training step), stopping and resuming, the FD
population's step protocol as the script drives it, and the Hub push path up to the network call. These run
the script's ``main`` in-process with tiny models."""

import json
import shutil
from pathlib import Path

import pytest
from train_fixtures import FAST_ARGS, encoder_args, run_script

from fd_onestep.demos.digits.recipes import RECIPES


def _args(assets, out, *extra, teacher="unet2d", encoders=("dinov2", "siglip")):
    return ["--pretrained_model_name_or_path", assets["teachers"][teacher], *encoder_args(assets, encoders),
            "--output_dir", str(out), *FAST_ARGS, *extra]


def _nothing_trained(out):
    return not list(out.glob("checkpoint-*")) and not (out / "model_index.json").exists()


# ------------------------------------------------------------------------------------------ arguments
def test_model_encoders_and_stats_go_together(script):
    with pytest.raises(ValueError, match="together"):
        script.parse_args(["--encoders", "dinov2", "--reference_stats", "x.safetensors"])


def test_one_stats_file_per_encoder(script, assets, tmp_path):
    with pytest.raises(ValueError, match="one stats file per encoder"):
        script.parse_args(["--pretrained_model_name_or_path", assets["teachers"]["unet2d"],
                           "--encoders", assets["encoders"]["dinov2"], assets["encoders"]["siglip"],
                           "--reference_stats", assets["stats"]["dinov2"], "--output_dir", str(tmp_path)])


def test_missing_stats_file_names_the_stats_command(script, assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="fd-onestep stats"):
        script.parse_args(["--pretrained_model_name_or_path", assets["teachers"]["unet2d"],
                           "--encoders", "dinov2", "--reference_stats", str(tmp_path / "missing.safetensors")])


def test_exact_population_replaces_gradient_accumulation(script, assets, tmp_path):
    with pytest.raises(ValueError, match="--fd_micro_batches instead of --gradient_accumulation_steps"):
        script.parse_args(_args(assets, tmp_path, "--fd_population", "exact", "--gradient_accumulation_steps", "2"))


def test_checkpoint_selection_never_uses_a_held_out_encoder(script, assets, tmp_path):
    with pytest.raises(ValueError, match="tune the held-out measure"):
        script.parse_args(_args(assets, tmp_path, "--eval_encoders", assets["encoders"]["siglip_eval"],
                                "--eval_reference_stats", assets["stats"]["siglip_eval"],
                                "--keep_best_by", "tiny-siglip-eval"))


def test_keep_best_by_accepts_the_encoder_as_given_or_its_short_name(script, assets, tmp_path):
    by_path = script.parse_args(_args(assets, tmp_path, "--keep_best_by", assets["encoders"]["dinov2"]))
    by_name = script.parse_args(_args(assets, tmp_path, "--keep_best_by", "tiny-dinov2"))
    assert by_path.keep_best_by == by_name.keep_best_by == "tiny-dinov2"
    with pytest.raises(ValueError, match="unknown"):
        script.parse_args(_args(assets, tmp_path, "--keep_best_by", "inception"))


def test_general_defaults_apply_when_a_model_is_given(script, assets, tmp_path):
    args = script.parse_args(["--pretrained_model_name_or_path", assets["teachers"]["unet2d"],
                              *encoder_args(assets), "--output_dir", str(tmp_path)])
    parser = script.build_parser()
    for key in RECIPES["digits-class"]:  # what a demo recipe would set keeps the parser's own default here
        # (finalize_args turns the absent loss weights into 1 each and absent eval stats into [])
        if key not in ("pretrained_model_name_or_path", "encoders", "reference_stats", "encoder_loss_weights",
                       "eval_reference_stats"):
            assert getattr(args, key) == parser.get_default(key), key
    assert args.embedded_default is None and args.compare_with_teacher is False


# ------------------------------------------------------------------------------------------ before training
def test_reference_stats_of_another_encoder_are_an_early_error(script, assets, tmp_path):
    argv = ["--pretrained_model_name_or_path", assets["teachers"]["unet2d"],
            "--encoders", assets["encoders"]["dinov2"], "--reference_stats", assets["stats"]["siglip"],
            "--output_dir", str(tmp_path / "out"), *FAST_ARGS]
    with pytest.raises(ValueError) as err:
        script.main(script.parse_args(argv))
    message = str(err.value)
    assert "tiny-dinov2" in message and "siglip" in message
    assert _nothing_trained(tmp_path / "out")


def test_unsupported_model_is_an_early_error_listing_the_supported_families(script, assets, tmp_path):
    model = tmp_path / "dance"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({
        "_class_name": "DanceDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet1DModel"], "scheduler": ["diffusers", "IPNDMScheduler"]}))
    argv = ["--pretrained_model_name_or_path", str(model), *encoder_args(assets), "--output_dir", str(tmp_path / "out"),
            *FAST_ARGS]
    with pytest.raises(ValueError, match="UNet1DModel.*supported families"):
        script.main(script.parse_args(argv))
    assert _nothing_trained(tmp_path / "out")


def test_push_without_a_token_fails_before_training(script, assets, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="hf auth login"):
        script.main(script.parse_args(_args(assets, tmp_path / "out", "--push_to_hub")))
    assert _nothing_trained(tmp_path / "out")


def test_push_while_offline_fails_before_training(script, assets, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="offline"):
        script.main(script.parse_args(_args(assets, tmp_path / "out", "--push_to_hub", "--hub_token", "hf_x")))
    assert _nothing_trained(tmp_path / "out")


def test_push_uploads_the_trained_pipeline_and_its_validated_card(script, assets, tmp_path, monkeypatch):
    """The whole run with --push_to_hub; the Hub calls are captured at the HfApi / HTTP-session boundary."""
    import huggingface_hub
    import huggingface_hub.repocard as repocard
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoUrl

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_from_login")
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, self.token, kwargs))
        return RepoUrl(f"https://huggingface.co/someone/{repo_id.split('/')[-1]}")

    def upload_folder(self, **kwargs):
        folder = kwargs["folder_path"]
        snapshot = sorted(p.name for p in Path(folder).iterdir())
        calls.append(("upload_folder", kwargs["repo_id"], self.token, {**kwargs, "snapshot": snapshot}))
        return "commit-info"

    class Response:
        status_code = 200
        text = ""

    class Session:
        def post(self, url, json=None, headers=None, **kwargs):
            calls.append(("validate", url, None, json))
            return Response()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(repocard, "get_session", lambda: Session())
    monkeypatch.setattr(repocard, "hf_raise_for_status", lambda response: None)

    out = tmp_path / "my-onestep"
    script.main(script.parse_args(_args(assets, out, "--push_to_hub", "--checkpointing_steps", "1")))

    names = [c[0] for c in calls]
    assert names == ["validate", "create_repo", "upload_folder"]
    _, url, _, body = calls[0]
    assert url.endswith("/api/validate-yaml") and body["content"] == (out / "README.md").read_text()
    _, repo_id, token, kwargs = calls[1]
    assert (repo_id, token, kwargs["exist_ok"]) == ("my-onestep", "hf_from_login", True)
    _, repo_id, token, kwargs = calls[2]
    assert (repo_id, token, kwargs["folder_path"]) == ("someone/my-onestep", "hf_from_login", str(out))
    assert {"README.md", "model_index.json", "unet", "pipeline_fd_onestep.py"} <= set(kwargs["snapshot"])
    assert "checkpoint-*" in kwargs["ignore_patterns"] and (out / "checkpoint-2").is_dir()
    shutil.rmtree(out)


# ------------------------------------------------------------------------------------------ stopping, resuming
def test_an_output_dir_that_is_a_file_is_an_early_error(script, assets, tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        script.parse_args(_args(assets, target))


def test_stop_after_steps_leaves_a_checkpoint_even_without_periodic_checkpoints(script, assets, tmp_path, caplog):
    """--stop_after_steps promises `resume with --resume_from_checkpoint latest`: that resume must continue."""
    out = tmp_path / "out"
    script.main(script.parse_args(_args(assets, out, "--stop_after_steps", "1", "--checkpointing_steps", "0")))
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    with caplog.at_level("INFO"):
        summary = script.main(script.parse_args(_args(assets, out, "--resume_from_checkpoint", "latest",
                                                      "--checkpointing_steps", "0")))
    assert "resumed at step 1" in caplog.text and summary["global_step"] == 2


def _lora_checkpoint(script, assets, out):
    script.main(script.parse_args(_args(assets, out, "--use_lora", "--lora_rank", "2", "--stop_after_steps", "1")))
    return out / "checkpoint-1" / "unet_lora" / "pytorch_lora_weights.safetensors"


def test_lora_resume_refuses_a_checkpoint_saved_for_another_component(script, assets, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    lora_file = _lora_checkpoint(script, assets, out)
    save_file({k.replace("unet.", "transformer.", 1): v for k, v in load_file(str(lora_file)).items()}, str(lora_file))
    with pytest.raises(RuntimeError, match="no weights for the 'unet' component"):
        script.main(script.parse_args(_args(assets, out, "--use_lora", "--lora_rank", "2",
                                            "--resume_from_checkpoint", "latest")))


def test_lora_resume_refuses_a_checkpoint_with_missing_lora_weights(script, assets, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    lora_file = _lora_checkpoint(script, assets, out)
    weights = load_file(str(lora_file))
    save_file({k: v for i, (k, v) in enumerate(sorted(weights.items())) if i % 2}, str(lora_file))
    with pytest.raises(RuntimeError, match="missing keys"):
        script.main(script.parse_args(_args(assets, out, "--use_lora", "--lora_rank", "2",
                                            "--resume_from_checkpoint", "latest")))


def test_offline_options_reach_the_encoders_and_a_missing_inception_file_is_an_early_error(script, assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        script.parse_args(_args(assets, tmp_path / "out", "--inception_weights", str(tmp_path / "missing.pth")))
    args = script.parse_args(_args(assets, tmp_path / "out", "--local_files_only", "--cache_dir", str(tmp_path)))
    assert script.teacher_load_kwargs(args) == {"cache_dir": str(tmp_path), "local_files_only": True}
    fingerprint = script.run_fingerprint(args)
    assert not {"cache_dir", "local_files_only", "inception_weights"} & set(fingerprint)


def test_gradient_accumulation_advances_the_ema_population_once_per_optimizer_step(script, assets, tmp_path):
    """With k micro-batches per step the EMA takes one update per optimizer step (warm start = update 1)."""
    from fd_onestep.training.state import load_state_file

    out = tmp_path / "out"
    script.main(script.parse_args(_args(assets, out, "--gradient_accumulation_steps", "2", "--max_train_steps", "3",
                                        "--checkpointing_steps", "1")))
    for step in (1, 2, 3):
        state = load_state_file(out / f"checkpoint-{step}" / "fd_populations.safetensors")
        assert {int(pop["num_updates"]) for pop in state.values()} == {step + 1}, step


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_exact_population_two_passes_see_the_same_features_under_mixed_precision(assets, tmp_path, precision):
    """Pass 1 (no grad) and pass 2 (grad) run the same autocast, so the population's own end-of-step check
    (pass-2 moments == pass-1 totals, bitwise on CPU) holds in float32 and bf16. (A subprocess: accelerate's
    mixed-precision state is per process.)"""
    out = tmp_path / "out"
    run_script(["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets),
                "--output_dir", str(out), *FAST_ARGS, "--fd_population", "exact", "--fd_micro_batches", "2",
                "--mixed_precision", precision, "--checkpointing_steps", "0"])
    assert json.loads((out / "fd_onestep_summary.json").read_text())["global_step"] == 2


def test_cpu_runs_use_the_cores_of_the_machine_not_accelerate_launchs_one_thread(script, assets, tmp_path,
                                                                                  monkeypatch):
    """`accelerate launch` without --cpu exports OMP_NUM_THREADS=1; a CPU run shares the cores among its local
    processes instead, unless --num_cpu_threads says otherwise."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    args = script.parse_args(_args(assets, tmp_path / "out"))
    assert script.cpu_threads(args, num_local_processes=1) == 8
    assert script.cpu_threads(args, num_local_processes=2) == 4
    assert script.cpu_threads(args, num_local_processes=16) == 1
    pinned = script.parse_args(_args(assets, tmp_path / "out", "--num_cpu_threads", "3"))
    assert script.cpu_threads(pinned, num_local_processes=2) == 3
    assert "num_cpu_threads" not in script.run_fingerprint(pinned)
