"""benchmarks/profile_main_job.py's accounting: every second goes to one part, and the floor blocks run between
the job's parts are charged to none of them (a fake clock, so nothing here depends on the machine's speed)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_main_job.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("profile_main_job", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    clock = {"now": 0.0}
    monkeypatch.setattr(module.time, "perf_counter", lambda: clock["now"])
    module.clock = clock
    return module


def test_a_probe_before_a_part_is_charged_to_the_probes_and_not_to_the_job(bench):
    clock = bench.clock

    class Job:
        def validate(self):
            clock["now"] += 2.0

    profile = bench.Profile()
    probes = []

    def probe():
        clock["now"] += 5.0
        probes.append(5.0)

    profile.wrap(Job, "validate", "validation", before=probe)
    job = Job()
    clock["now"] += 1.0  # the job's own time outside any part
    job.validate()
    job.validate()

    assert probes == [5.0, 5.0]
    assert profile.seconds["validation"] == 4.0
    assert profile.seconds[bench.PROBE] == 10.0
    assert profile.calls["validation"] == 2
    assert profile.total() == 5.0  # 1 s of the job's own + 2 x 2 s of validation; the probes' 10 s excluded


def test_parts_inside_a_step_are_timed_only_while_a_step_runs(bench):
    clock = bench.clock

    class Job:
        def step(self):
            clock["now"] += 1.0
            self.forward()

        def forward(self):
            clock["now"] += 3.0

    profile = bench.Profile()
    profile.wrap(Job, "step", bench.STEP)
    profile.wrap(Job, "forward", "denoiser forward", inside_step=True)
    job = Job()
    job.step()
    job.forward()  # outside a step (validation's sampling): charged to the enclosing part, here the root

    assert profile.seconds[bench.STEP] == 1.0
    assert profile.seconds["denoiser forward"] == 3.0
    assert profile.total() == 7.0
    assert profile.seconds[bench.ROOT] == 3.0


def test_the_comparison_is_timed_through_the_script_and_through_a_demo_hook(bench):
    # the digits demos reach their comparison through their config's hooks (demo.run_comparison), not the script's
    import types

    clock = bench.clock

    class Demo:
        label = "digits"

        def run_comparison(self, *args):
            clock["now"] += 4.0
            return {"from": "demo", "args": args}

    demos = {"digits": Demo(), "none": None}

    def run_comparison(*args):
        clock["now"] += 2.0
        return {"from": "script"}

    script = types.SimpleNamespace(run_comparison=run_comparison, demo_of=lambda args: demos[args])

    def trainer_end(args):  # what train_fd_onestep.main does at the end of a run
        demo = script.demo_of(args)
        compare = demo.run_comparison if demo is not None else script.run_comparison
        return compare(1, 2)

    profile = bench.Profile()
    bench.time_comparison(script, profile)
    assert trainer_end("digits") == {"from": "demo", "args": (1, 2)}
    assert script.demo_of("digits").label == "digits"  # the other hooks pass through untimed
    assert trainer_end("none") == {"from": "script"}
    clock["now"] += 1.0

    assert profile.seconds[bench.COMPARISON] == 6.0
    assert profile.calls[bench.COMPARISON] == 2
    assert profile.total() == 7.0
