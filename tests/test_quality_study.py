"""Specification of ``benchmarks/quality_study.py``: held-out FD of every checkpoint of several training seeds
against the teacher's multi-step samplers, on tiny runs of the training script (CI size)."""

import json
import sys
from pathlib import Path

import pytest
from train_fixtures import FAST_ARGS, REPO_ROOT, SUBPROCESS_ENV, encoder_args

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import quality_study as qs  # noqa: E402

pytestmark = pytest.mark.slow

SEEDLESS_FAST_ARGS = [a for i, a in enumerate(FAST_ARGS) if a != "--seed" and FAST_ARGS[i - 1] != "--seed"]


def _train_args(assets, *extra):
    return ["--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets),
            "--eval_encoders", assets["encoders"]["siglip_eval"], "--eval_reference_stats", assets["stats"]["siglip_eval"],
            *SEEDLESS_FAST_ARGS, "--checkpointing_steps", "1", "--validation_steps", "1", "--num_cpu_threads", "1",
            *extra]


@pytest.fixture(scope="module")
def study(assets, tmp_path_factory, monkeypatch_module):
    """Two training seeds launched by the study itself (EMA of the weights on, the last weights kept), measured."""
    root = tmp_path_factory.mktemp("quality")
    for key, value in SUBPROCESS_ENV.items():
        monkeypatch_module.setenv(key, value)
    out = qs.main(["--launch", "--runs_root", str(root / "runs"), "--seeds", "0", "1", "--output_dir",
                   str(root / "out"), "--name", "tiny", "--num_samples", "16", "--teacher_steps", "2", "3",
                   "--batch_size", "8", "--",
                   *_train_args(assets, "--use_ema", "--ema_decay", "0.5", "--keep_best_by", "fd_r_mean",
                                "--final_weights", "last")])
    return root, out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_launch_trains_one_run_per_seed_with_its_checkpoints(study):
    root, _ = study
    for seed in (0, 1):
        run = root / "runs" / f"seed{seed}"
        assert (run / "fd_onestep_summary.json").is_file()
        assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
        assert json.loads((run / "fd_onestep_run_args.json").read_text())["args"]["seed"] == seed


def test_every_checkpoint_of_every_seed_and_both_teacher_samplers_are_measured_in_every_representation(study):
    _, out = study
    s = out["study"]
    assert list(s["teacher"]) == ["teacher, dpmsolver++ 2 steps", "teacher, dpmsolver++ 3 steps"]
    assert s["representations"] == {"tiny-dinov2": {"held_out": False}, "tiny-siglip": {"held_out": False},
                                    "tiny-siglip-eval": {"held_out": True}}
    assert [r["seed"] for r in s["runs"]] == [0, 1]
    for run in s["runs"]:
        assert set(run["steps"]) == {"1", "2", "kept"}
        for measures in run["steps"].values():
            assert set(measures["fd"]) == set(s["representations"])
            assert all(v > 0 for v in measures["fd"].values())
    # two seeds are two different students
    assert s["runs"][0]["steps"]["2"]["fd"] != s["runs"][1]["steps"]["2"]["fd"]


def test_a_checkpoint_is_judged_with_its_generator_ema_weights_like_the_run_saved_them(study):
    # --final_weights last with --use_ema: the run's output is the EMA of step 2; checkpoint-2 holds the raw
    # weights and the EMA, and the study must measure the EMA (the same samples, the same numbers)
    _, out = study
    for run in out["study"]["runs"]:
        assert run["kept"] == {"step": 2, "which": "last", "chosen_by": "the last step"}
        assert run["steps"]["kept"]["fd"] == run["steps"]["2"]["fd"]


def test_the_record_says_what_chose_and_that_held_out_representations_chose_nothing(study):
    _, out = study
    assert "held-out representations chose nothing" in out["study"]["chosen_on"]
    table = out["files"]["table"].read_text()
    assert "Chosen on: the kept weights: the last step" in table
    assert "FD tiny-siglip-eval (held out)" in table and "FD tiny-dinov2 (training)" in table
    assert "| teacher, dpmsolver++ 2 steps | - |" in table
    assert "| student, 1 step (FD-loss) | kept (step 2) |" in table
    record = json.loads(out["files"]["record"].read_text())
    held = record["summary"]["2"]["fd/tiny-siglip-eval"]
    values = [r["steps"]["2"]["fd"]["tiny-siglip-eval"] for r in record["runs"]]
    assert held["n"] == 2 and held["mean"] == pytest.approx(sum(values) / 2)
    assert held["min"] == min(values) and held["max"] == max(values)
    ratio = held["mean"] / record["teacher"]["teacher, dpmsolver++ 2 steps"]["fd"]["tiny-siglip-eval"]
    assert f"({ratio:.2f}x)" in table


def test_the_plot_is_a_png(study):
    _, out = study
    assert out["files"]["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_run_is_measured_as_is_when_launched_again(study, assets):
    root, _ = study
    before = {p: p.stat().st_mtime_ns for p in (root / "runs" / "seed0").rglob("*") if p.is_file()}
    lines = []
    qs.launch_runs(root / "runs", [0], _train_args(assets), log=lines.append)
    assert lines == [f"{root / 'runs' / 'seed0'}: finished, measured as is"]
    assert {p: p.stat().st_mtime_ns for p in (root / "runs" / "seed0").rglob("*") if p.is_file()} == before


def test_runs_of_different_recipes_are_refused(study, tmp_path):
    root, _ = study
    other = tmp_path / "other"
    other.mkdir()
    saved = json.loads((root / "runs" / "seed1" / "fd_onestep_run_args.json").read_text())
    saved["args"]["learning_rate"] = 1.0
    (other / "fd_onestep_run_args.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"differs from .* in \['learning_rate'\]"):
        qs.measure_runs([root / "runs" / "seed0", other], num_samples=16, teacher_steps=[2])


def test_the_study_sets_seed_and_output_dir_itself(tmp_path):
    with pytest.raises(ValueError, match="sets --seed and --output_dir"):
        qs.launch_runs(tmp_path, [0], ["--seed", "3"])
    with pytest.raises(SystemExit, match="--launch needs --runs_root"):
        qs.main(["--launch"])


def test_default_output_dir_is_the_results_folder():
    expected = "results" if (REPO_ROOT / "results").is_dir() else str(Path("benchmarks") / "results")
    assert qs.default_output_dir() == REPO_ROOT / expected / "quality_study"


def test_a_class_conditional_study_adds_per_class_fd_and_the_overview_shows_it_beside_an_unconditional_one(study, assets, tmp_path, monkeypatch):
    for key, value in SUBPROCESS_ENV.items():
        monkeypatch.setenv(key, value)
    args = _train_args(assets)
    args[args.index(assets["teachers"]["unet2d"])] = assets["teachers"]["unet2d_class"]
    runs = qs.launch_runs(tmp_path / "runs", [0], [*args, "--max_train_steps", "1", "--num_validation_samples", "20"])
    class_study = qs.measure_runs(runs, num_samples=20, teacher_steps=[2], batch_size=10)
    assert class_study["conditioning"] == "class"
    for measures in [*class_study["teacher"].values(), *class_study["runs"][0]["steps"].values()]:
        assert set(measures["per_class_fd"]) == set(class_study["representations"])
        assert measures["adherence"] is None  # no --classifier in this run
    table = qs.format_table(class_study)
    assert "per-class FD tiny-siglip-eval (held out)" in table and "| adherence |" in table

    # the overview puts it beside the unconditional study: per-class FD for the conditional row (marginal FD is
    # blind to the label), adherence left out where no run measured it
    assert qs.headline_columns(class_study) == [("per_class_fd", "tiny-siglip-eval")]
    files = qs.write_study(class_study, tmp_path / "out", "class", plot=False)
    root, _ = study
    out = qs.main(["--overview", f"uncond={root / 'out' / 'tiny.json'}", f"class={files['record']}",
                   "--output_dir", str(tmp_path / "out"), "--name", "overview"])
    assert out["files"]["plot"] == tmp_path / "out" / "overview.png"
    assert out["files"]["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="LABEL=PATH"):
        qs.main(["--overview", str(files["record"])])


def test_a_lora_checkpoint_is_judged_with_its_lora_and_generator_ema_on_the_runs_base(assets, tmp_path, monkeypatch):
    for key, value in SUBPROCESS_ENV.items():
        monkeypatch.setenv(key, value)
    runs = qs.launch_runs(tmp_path / "runs", [0], [*_train_args(assets), "--use_lora", "--use_ema", "--ema_decay",
                                                   "0.5", "--final_weights", "last"])
    study = qs.measure_runs(runs, num_samples=16, teacher_steps=[2], batch_size=8)
    steps = study["runs"][0]["steps"]
    assert set(steps) == {"1", "2", "kept"}
    assert steps["kept"]["fd"] == steps["2"]["fd"]  # the saved LoRA is the EMA of step 2: the same numbers
    assert steps["1"]["fd"] != steps["2"]["fd"]  # and checkpoint-1 is its own LoRA, not the output's


def test_the_text_demo_is_measured_against_its_stock_multi_step_pipeline_and_other_text_runs_are_refused():
    from argparse import Namespace
    from types import SimpleNamespace

    teachers = qs.teacher_generators(Namespace(), "text", [2, 3], "dpmsolver++", "cpu")
    assert list(teachers) == ["teacher, dpmsolver++ 2 steps", "teacher, dpmsolver++ 3 steps"]
    assert teachers["teacher, dpmsolver++ 2 steps"].description == "dpmsolver++ 2 steps"
    text_pipe = SimpleNamespace(is_text_conditional=True, is_class_conditional=False)
    assert qs.conditioning_kind(Namespace(embedded_default="digits-text"), text_pipe) == "text"
    with pytest.raises(ValueError, match="text-to-image runs of the digits-text demo only"):
        qs.conditioning_kind(Namespace(embedded_default=None), text_pipe)


def _lever_run(root, name, student_fd, teacher_fd, train_seconds, conditional=False):
    """A finished run's own records, as the training script writes them (comparison, summary, kept weights)."""
    run = root / name
    run.mkdir()
    reps = {"train-enc": {"held_out": False}, "held-enc": {"held_out": True}}

    def generator(fd):
        out = {"fd": {"train-enc": 9.0, "held-enc": fd}}
        if conditional:
            out["conditioning"] = {r: {"per_class_fd": 2 * fd} for r in reps}
            out["adherence"] = 0.5 + fd / 10
        return out

    (run / "comparison.json").write_text(json.dumps({"representations": reps, "generators": {
        "teacher, 1 step (naive)": generator(50.0), "teacher, dpmsolver++ 20 steps": generator(teacher_fd),
        qs.STUDENT: generator(student_fd)}}))
    (run / "fd_onestep_summary.json").write_text(json.dumps(
        {"global_step": 10, "train_seconds": train_seconds, "final_weights": {"which": "best", "step": 8}}))
    (run / "fd_onestep_best.json").write_text(json.dumps({"step": 8, "keep_best_by": "fd_r_mean", "metric": 1.5}))
    return run


def test_the_lever_table_reads_each_runs_own_comparison_as_ratios_to_its_teacher_and_time_to_the_baseline(tmp_path):
    base = _lever_run(tmp_path, "base", 2.0, 1.0, 100.0)
    lever = _lever_run(tmp_path, "lever", 0.9, 1.2, 150.0)
    out = qs.main(["--levers", f"none={base}", f"fd_ema_beta=0.99={lever}", "--output_dir", str(tmp_path / "out"),
                   "--name", "levers"])
    table = out["files"]["table"].read_text()
    assert "| none | 2.00 (2) | fd_r_mean 1.500 (step 8) | 100 s (1.00x) |" in table
    assert "| fd_ema_beta=0.99 | 0.75 (0.9) | fd_r_mean 1.500 (step 8) | 150 s (1.50x) |" in table
    assert "train-enc" not in table  # held-out representations only: the training ones are the kept weights' column
    assert json.loads(out["files"]["record"].read_text())["rows"]["none"]["measures"] == {"fd/held-enc": [2.0, 1.0]}


def test_a_conditional_lever_table_adds_per_class_fd_and_adherence_and_demos_are_not_mixed(tmp_path):
    cls = _lever_run(tmp_path, "class", 1.0, 2.0, 10.0, conditional=True)
    row = qs.lever_table({"class": cls})["rows"]["class"]
    assert row["measures"]["per_class_fd/held-enc"] == (2.0, 4.0)
    assert row["measures"]["adherence"] == (0.6, 0.7)
    assert "60.0% (70.0%)" in qs.format_lever_table(qs.lever_table({"class": cls}))
    with pytest.raises(ValueError, match="levers of one demo go in one table"):
        qs.lever_table({"class": cls, "uncond": _lever_run(tmp_path, "uncond", 1.0, 2.0, 10.0)})
    with pytest.raises(SystemExit, match="LABEL=PATH"):
        qs.main(["--levers", f"x={tmp_path / 'nowhere'}"])
