"""``fd-onestep demo``: the page answers for the digits class and text models, for a tiny SDXL teacher's LoRA run,
and as the Space folder a run writes (``python app.py``); in a real browser, a typed prompt yields an image of the
model's size that changes with the prompt, and the page asks nothing of any other host than the app's.

The digits models are the bundled digits teachers as one-step pipelines (``FDOneStepPipeline.from_teacher``,
saved as a folder the way a run saves its pipeline): no trained student is bundled. Servers listen on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'fd-onestep[demo]' (in the test extra)")

from fd_onestep.demo import build_demo, launch_demo, load_demo_model  # noqa: E402
from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline  # noqa: E402

HOST = "127.0.0.1"
pytestmark = pytest.mark.filterwarnings("ignore:ill-conditioned one-step map")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """The bundled digits-text and digits-class teachers as one-step pipeline folders (the class model with its
    null class, as the digits-class recipe builds it)."""
    from fd_onestep.demos.digits import CLASS_TEACHER_PATH, NULL_CLASS_LABEL, TEXT_TEACHER_PATH

    root = tmp_path_factory.mktemp("digits_runs")
    runs = {}
    for name, teacher, kwargs in (("text", TEXT_TEACHER_PATH, {}),
                                  ("class", CLASS_TEACHER_PATH, {"null_class_label": NULL_CLASS_LABEL})):
        FDOneStepPipeline.from_teacher(teacher, local_files_only=True, **kwargs).save_pretrained(root / name)
        runs[name] = root / name
    return runs


def _call(port: int, api_name: str, data: list, timeout: float = 120) -> list:
    """The app's HTTP API as any client calls it: POST the inputs, read the event stream for the outputs."""
    base = f"http://{HOST}:{port}/gradio_api/call/{api_name}"
    request = urllib.request.Request(base, data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        event_id = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(f"{base}/{event_id}", timeout=timeout) as r:
        lines = r.read().decode().splitlines()
    events = [(a, b) for a, b in zip(lines, lines[1:]) if a.startswith("event:")]
    kind, payload = events[-1]
    assert kind == "event: complete", lines
    return json.loads(payload.removeprefix("data: "))


def _image(port: int, output: dict) -> Image.Image:
    url = output["url"]
    assert url.startswith(f"http://{HOST}:{port}/"), url  # served by the app itself
    with urllib.request.urlopen(url, timeout=30) as r:
        return Image.open(io.BytesIO(r.read())).convert("RGB")


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/gradio_api/info", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the app did not answer on port {port} within {timeout} s")


def test_digits_class_and_text_pages_answer_with_images_of_the_models_size(digits_runs):
    for name, condition in (("class", 7), ("text", "a handwritten seven")):
        model = load_demo_model(digits_runs[name], device="cpu")
        assert model.conditioning == name and model.image_size == (16, 16)
        if name == "class":  # the picker offers the ten digits (not the null class), with guidance through it
            assert model.class_choices == [(str(i), i) for i in range(10)] and model.has_guidance
        port = _free_port()
        demo = build_demo(model)
        launch_demo(demo, port=port, block=False)
        try:
            images = []
            for seed in (0, 0, 1):
                outputs = _call(port, "generate", [condition, seed, 1.0])
                assert outputs[1].startswith("**one step, cpu:") and outputs[1].endswith(" ms**")
                images.append(np.asarray(_image(port, outputs[0])))
        finally:
            demo.close()
        assert images[0].shape == (16, 16, 3)
        assert np.array_equal(images[0], images[1])  # a seed is an image
        assert not np.array_equal(images[0], images[2])
