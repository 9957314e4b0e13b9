"""Specification of the training-script library (fd_onestep.training): checkpoints written atomically
and pruned, run fingerprints, secret handling, pickle-free training state, Hub push checks."""

import json
import os

import pytest
import torch
from accelerate import Accelerator

from fd_onestep.training import checkpoints, hub, run_args, state


@pytest.fixture
def accelerator():
    return Accelerator(cpu=True)


def _prepared(accelerator):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return accelerator.prepare(model, optimizer)


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_is_complete_only_after_the_atomic_rename(tmp_path, accelerator):
    _prepared(accelerator)
    path = checkpoints.save_checkpoint_atomically(accelerator, tmp_path, 10, {"note": "x"})
    assert path == tmp_path / "checkpoint-10" and path.is_dir()
    marker = json.loads((path / checkpoints.CHECKPOINT_MARKER).read_text())
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.name != checkpoints.CHECKPOINT_MARKER}
    assert marker.pop("write_seconds") >= 0  # how long a stop checkpoint will take (preemption)
    assert marker == {"step": 10, "note": "x", "files": files}  # every file with its size: damage is detectable
    assert checkpoints.latest_checkpoint(tmp_path) == path
    assert not list(tmp_path.glob(".checkpoint-*"))  # no temporary folder left behind


def test_interrupted_save_leaves_the_previous_checkpoint_as_latest(tmp_path, accelerator, monkeypatch):
    _prepared(accelerator)
    checkpoints.save_checkpoint_atomically(accelerator, tmp_path, 1)
    real_save_state = accelerator.save_state

    def crash_midway(output_dir, **kwargs):
        real_save_state(output_dir, **kwargs)  # files written...
        raise KeyboardInterrupt("preempted")  # ...but the job dies before the rename

    monkeypatch.setattr(accelerator, "save_state", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint_atomically(accelerator, tmp_path, 2)
    assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert [p.name for p in checkpoints.list_partial_checkpoints(tmp_path)] == [".checkpoint-2.partial"]
    assert checkpoints.resolve_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-1"


def test_unmarked_checkpoint_folder_is_never_picked_by_latest_and_is_an_error_by_path(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()  # e.g. written by another tool, or a half-copied folder
    assert checkpoints.latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete"):
        checkpoints.resolve_resume_checkpoint(str(tmp_path / "checkpoint-5"), tmp_path)


def test_resume_from_a_missing_path_is_an_early_error_naming_what_exists(tmp_path, accelerator):
    _prepared(accelerator)
    checkpoints.save_checkpoint_atomically(accelerator, tmp_path, 3)
    with pytest.raises(FileNotFoundError, match=r"checkpoint-3"):
        checkpoints.resolve_resume_checkpoint("checkpoint-99", tmp_path)
    assert checkpoints.resolve_resume_checkpoint("checkpoint-3", tmp_path) == tmp_path / "checkpoint-3"


def test_resume_latest_without_checkpoints_starts_a_new_run(tmp_path):
    assert checkpoints.resolve_resume_checkpoint("latest", tmp_path / "nothing-here") is None
    assert checkpoints.resolve_resume_checkpoint(None, tmp_path) is None


def test_saving_the_same_step_again_replaces_the_checkpoint(tmp_path, accelerator):
    _prepared(accelerator)
    checkpoints.save_checkpoint_atomically(accelerator, tmp_path, 4, {"run": 1})
    checkpoints.save_checkpoint_atomically(accelerator, tmp_path, 4, {"run": 2})
    assert json.loads((tmp_path / "checkpoint-4" / checkpoints.CHECKPOINT_MARKER).read_text())["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_pruning_keeps_the_newest_checkpoints_up_to_the_limit(tmp_path, accelerator):
    _prepared(accelerator)
    for step in (2, 4, 6, 8):
        checkpoints.save_checkpoint_atomically(accelerator, tmp_path, step)
    removed = checkpoints.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-8"]
    assert checkpoints.prune_checkpoints(tmp_path, None) == []
    with pytest.raises(ValueError, match="total_limit"):
        checkpoints.prune_checkpoints(tmp_path, 0)


def test_checkpoints_sort_by_step_not_by_name(tmp_path, accelerator):
    _prepared(accelerator)
    for step in (9, 10, 100):
        checkpoints.save_checkpoint_atomically(accelerator, tmp_path, step)
    assert checkpoints.latest_checkpoint(tmp_path).name == "checkpoint-100"


# ------------------------------------------------------------------------------------------ fingerprint
def _args(**overrides):
    base = {"pretrained_model_name_or_path": "m", "learning_rate": 1e-5, "lr_scheduler": "cosine",
            "max_train_steps": 100, "output_dir": "out", "hub_token": "hf_secret", "validation_steps": 10}
    base.update(overrides)
    return base


def test_fingerprint_ignores_where_and_how_often_but_not_what(tmp_path):
    fp = run_args.run_fingerprint(_args())
    assert "output_dir" not in fp and "validation_steps" not in fp and "hub_token" not in fp
    assert fp["learning_rate"] == 1e-5 and fp["num_processes"] == 1
    assert run_args.run_fingerprint(_args(output_dir="elsewhere", validation_steps=3)) == fp
    assert run_args.run_fingerprint(_args(learning_rate=2e-5)) != fp
    assert run_args.run_fingerprint(_args(), num_processes=2) != fp  # the global batch differs


def test_max_train_steps_matters_only_for_schedules_that_depend_on_it():
    assert run_args.run_fingerprint(_args(max_train_steps=100)) != run_args.run_fingerprint(_args(max_train_steps=200))
    constant = dict(lr_scheduler="constant")
    assert run_args.run_fingerprint(_args(max_train_steps=100, **constant)) == run_args.run_fingerprint(
        _args(max_train_steps=200, **constant))


def test_output_dir_with_another_runs_checkpoints_is_an_error_listing_the_differences(tmp_path, accelerator):
    _prepared(accelerator)
    fp = run_args.run_fingerprint(_args())
    run_args.write_run_args(tmp_path, _args(), fp)
    checkpoints.save_checkpoint_atomically(accelerator, tmp_path, 1)
    run_args.check_output_dir_compatible(tmp_path, fp)  # same run: fine
    with pytest.raises(ValueError, match=r"--learning_rate: 1e-05 \(saved\) vs 0\.001 \(now\)") as err:
        run_args.check_output_dir_compatible(tmp_path, run_args.run_fingerprint(_args(learning_rate=1e-3)))
    assert "fresh --output_dir" in str(err.value)


def test_output_dir_with_unattributable_checkpoints_is_an_error(tmp_path, accelerator):
    _prepared(accelerator)
    checkpoints.save_checkpoint_atomically(accelerator, tmp_path, 1)
    with pytest.raises(ValueError, match="cannot be attributed"):
        run_args.check_output_dir_compatible(tmp_path, run_args.run_fingerprint(_args()))
    run_args.check_output_dir_compatible(tmp_path / "empty", run_args.run_fingerprint(_args()))  # nothing there: fine


def test_hub_token_is_never_written_with_the_run_args(tmp_path):
    path = run_args.write_run_args(tmp_path, _args(hub_token="hf_verysecret"), run_args.run_fingerprint(_args()))
    text = path.read_text()
    assert "hf_verysecret" not in text and "hub_token" not in text
    assert json.loads(text)["args"]["learning_rate"] == 1e-5


# ------------------------------------------------------------------------------------------ state files
def test_training_state_round_trips_through_safetensors_without_pickle(tmp_path):
    saved = {"pop": {"count": 7, "sum": torch.randn(3, dtype=torch.float64), "queue": [torch.ones(2), torch.zeros(2)],
                     "beta": 0.99, "nan": float("inf"), "name": "ema", "none": None, "flag": True},
             "ints": {1: torch.arange(3)}}
    state.save_state_file(saved, tmp_path / "s.safetensors")
    loaded = state.load_state_file(tmp_path / "s.safetensors")
    assert loaded["pop"]["count"] == 7 and loaded["pop"]["beta"] == 0.99 and loaded["pop"]["name"] == "ema"
    assert loaded["pop"]["none"] is None and loaded["pop"]["flag"] is True and loaded["pop"]["nan"] == float("inf")
    assert torch.equal(loaded["pop"]["sum"], saved["pop"]["sum"]) and loaded["pop"]["sum"].dtype == torch.float64
    assert isinstance(loaded["pop"]["queue"], list) and torch.equal(loaded["pop"]["queue"][0], torch.ones(2))
    assert torch.equal(loaded["ints"][1], torch.arange(3))


def test_state_with_arbitrary_objects_is_refused_rather_than_pickled(tmp_path):
    with pytest.raises(TypeError, match="without pickle"):
        state.save_state_file({"x": object()}, tmp_path / "s.safetensors")


def test_sampling_generator_resumes_its_stream_exactly():
    a = state.CheckpointableGenerator(seed=3)
    torch.randn(5, generator=a.generator)
    saved = a.state_dict()
    expected = torch.randn(4, generator=a.generator)
    b = state.CheckpointableGenerator(seed=0)
    b.load_state_dict(saved)
    assert torch.equal(torch.randn(4, generator=b.generator), expected)


def test_training_progress_state_round_trip():
    p = state.TrainingProgress()
    p.global_step, p.best_metric, p.best_step = 12, 0.5, 10
    p.history.append({"step": 10, "fd": 0.5})
    q = state.TrainingProgress()
    q.load_state_dict(p.state_dict())
    assert q.state_dict() == p.state_dict()


# ------------------------------------------------------------------------------------------ Hub
def test_push_while_offline_is_an_early_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="offline"):
        hub.check_push_to_hub("hf_token", None, "out")


def test_push_without_a_token_is_an_early_error_pointing_to_hf_auth_login(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="hf auth login"):
        hub.check_push_to_hub(None, None, "out")


def test_push_repo_id_defaults_to_the_output_dir_name(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_from_login")
    assert hub.check_push_to_hub(None, None, tmp_path / "my-onestep") == ("my-onestep", "hf_from_login")
    assert hub.check_push_to_hub(None, "me/model", tmp_path) == ("me/model", "hf_from_login")
    with pytest.raises(ValueError, match="repo id"):
        hub.check_push_to_hub(None, "a/b/c", tmp_path)


def test_token_on_the_command_line_warns_but_is_not_logged(monkeypatch, caplog):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with caplog.at_level("WARNING"):
        assert hub.check_push_to_hub("hf_cmdline_secret", "me/x", "out") == ("me/x", "hf_cmdline_secret")
    assert "hf auth login" in caplog.text and "hf_cmdline_secret" not in caplog.text


def test_push_creates_the_repo_and_uploads_the_folder_without_checkpoints(monkeypatch, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    calls = []

    def fake_create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs, self.token))
        return RepoUrl(f"https://huggingface.co/me/{repo_id.split('/')[-1]}")

    def fake_upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs, self.token))
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    assert hub.push_folder_to_hub(tmp_path, "my-model", "hf_tok", private=True) == "commit"
    (name1, repo1, kw1, tok1), (name2, repo2, kw2, tok2) = calls
    assert (name1, repo1, kw1["exist_ok"], kw1["private"], tok1) == ("create_repo", "my-model", True, True, "hf_tok")
    assert (name2, repo2, tok2) == ("upload_folder", "me/my-model", "hf_tok")
    assert kw2["folder_path"] == str(tmp_path)
    assert "checkpoint-*" in kw2["ignore_patterns"]


# ------------------------------------------------------------------------------------------ arguments
def test_name_lists_accept_spaces_and_commas():
    assert run_args.parse_name_list(["a,b", "c"]) == ["a", "b", "c"]
    assert run_args.parse_name_list("x") == ["x"] and run_args.parse_name_list(None) == []
    assert run_args.parse_float_list(["1", "0.5,2"], "w") == [1.0, 0.5, 2.0]
    with pytest.raises(ValueError, match="--w"):
        run_args.parse_float_list(["abc"], "w")


def test_env_has_no_hub_token_leak_helpers():
    # public_args drops secrets entirely (not masked): nothing to grep for in logs or trackers
    assert "hub_token" not in run_args.public_args({"hub_token": "x", "a": 1})
    assert run_args.public_args({"a": os.path.join("p", "q")}) == {"a": os.path.join("p", "q")}
