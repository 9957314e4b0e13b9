"""benchmarks/gpu_check.py, the GPU acceptance script: its CPU mode on the smallest sizes, so it cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on 2 shared cores: more threads only oversubscribe
    yield module
    torch.set_num_threads(threads)


def test_cpu_mode_runs_every_family_and_check_on_the_smallest_sizes(gpu_check, capsys):
    assert gpu_check.main(["--cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    for family in gpu_check.FAMILIES:
        for training in gpu_check.TRAININGS:
            assert f"| {family} | {training} |" in out
    assert "| 64 | ReferenceStats.frechet_distance |" in out and "| 64 | frechet_distance |" in out
    assert "FD-loss forward+backward (EMA population) | d = 64, batch 4 |" in out
    assert "ratio FD-loss / generator" in out
    assert "FAIL" not in out and out.rstrip().endswith("all checks passed")


def test_a_failed_check_makes_it_exit_non_zero(gpu_check, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "VALUE_RTOL", -1.0)  # no FD agreement can pass this
    assert gpu_check.main(["--cpu", "--quick", "--families", "unet2d", "--trainings", "full"]) == 1
    out = capsys.readouterr().out
    assert "FAILED CHECK(S)" in out and "| 16 | frechet_distance |" in out and "FAIL |" in out
