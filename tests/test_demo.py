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


@pytest.fixture(scope="module", autouse=True)
def _own_gradio_cache(tmp_path_factory):
    """Gradio writes every served image to its cache folder, a file per content hash (default /tmp/gradio, shared
    by every Gradio process of the machine): these apps get their own."""
    folder = str(tmp_path_factory.mktemp("gradio_cache"))
    previous, os.environ["GRADIO_TEMP_DIR"] = os.environ.get("GRADIO_TEMP_DIR"), folder
    yield folder
    if previous is None:
        del os.environ["GRADIO_TEMP_DIR"]
    else:
        os.environ["GRADIO_TEMP_DIR"] = previous


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
        content, kind = r.read(), r.headers.get("Content-Type", "")
    try:
        return Image.open(io.BytesIO(content)).convert("RGB")
    except Exception as err:
        raise AssertionError(f"{url} ({kind}, {len(content)} bytes) is not an image") from err


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


# ------------------------------------------------------------------------------------------------ in a browser
def _browser_or_skip():
    """Headless Chromium through selenium, or a skip naming what is missing."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        pytest.skip(f"no headless browser ({', '.join(missing)} not found): apt-get install chromium chromium-driver "
                    "(.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install 'fd-onestep[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1360,760",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-default-apps", "--disable-sync"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))


def _shown_image(driver, element_id: str, previous: str | None, timeout: float):
    """Wait until the image of ``element_id`` is shown with another source than ``previous``: (src, width, height)."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = (f"const img = document.querySelector('#{element_id} img');"
              "return img && img.complete && img.naturalWidth ? [img.src, img.naturalWidth, img.naturalHeight] : null;")
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: (lambda r: r if r and r[0] != previous else None)(d.execute_script(script)))


def _wait_for_pixels(driver, element_id: str, previous: str, expected: np.ndarray, deadline: float):
    """Wait until ``element_id`` shows ``expected`` (the images of a prompt's prefixes, generated while it is typed,
    may come first): (src, pixels)."""
    while True:
        src, _, _ = _shown_image(driver, element_id, previous, timeout=max(0.05, deadline - time.monotonic()))
        with urllib.request.urlopen(src, timeout=10) as r:
            content, kind = r.read(), r.headers.get("Content-Type", "")
        try:
            shown = np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))
        except Exception as err:
            raise AssertionError(f"{element_id} shows {src} ({kind}, {len(content)} bytes): not an image") from err
        if shown.shape == expected.shape and np.array_equal(shown, expected):
            return src, shown
        previous = src


def test_in_a_browser_a_typed_prompt_yields_an_image_that_changes_with_the_prompt(digits_runs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from fd_onestep.demos.digits import TEXT_TEACHER_PATH

    driver = _browser_or_skip()
    # The teacher beside the student: the bundled teacher's 20 DPM-Solver++ steps. FD_ONESTEP_DEMO_RUN: a trained
    # digits-text run to show instead of the teacher's naive one step (the README's screenshot, docs/demo.md)
    run = os.environ.get("FD_ONESTEP_DEMO_RUN") or digits_runs["text"]
    model = load_demo_model(run, device="cpu", teacher=str(TEXT_TEACHER_PATH))
    port = _free_port()
    demo = build_demo(model, title="fd-onestep demo: digits-text")
    launch_demo(demo, port=port, block=False)
    try:
        driver.get(f"http://{HOST}:{port}/")
        # the page loads with the example prompt's images
        src, w, h = _shown_image(driver, "onestep-image", None, timeout=60)
        teacher_src = _shown_image(driver, "teacher-image", None, timeout=60)[0]
        prompt = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
        pixels, latencies = [], []
        for text in ("the digit two", "a handwritten nine"):
            # this prompt's images at seed 0, one step and the teacher's 20 steps
            expected = np.asarray(model.generate(text, 0, 1.0)[0].convert("RGB"))
            expected_teacher = np.asarray(model.generate_teacher(text, 0, 1.0)[0].convert("RGB"))
            prompt.send_keys(Keys.CONTROL, "a")
            prompt.send_keys(text)  # live mode: typed, never submitted
            typed = time.monotonic()
            # the acceptance of issue 34: the typed prompt's image within 2 s on a CPU (the model takes ~0.1 s)
            src, shown = _wait_for_pixels(driver, "onestep-image", src, expected, deadline=typed + 2.0)
            latencies.append(time.monotonic() - typed)
            assert shown.shape == (16, 16, 3)  # the model's image, at its size
            pixels.append(shown)
            timing = driver.find_element(By.ID, "onestep-time").text
            assert timing.startswith("one step, cpu:") and timing.endswith(" ms"), timing
            # the teacher follows the prompt too, with its own time
            teacher_src, _ = _wait_for_pixels(driver, "teacher-image", teacher_src, expected_teacher,
                                              deadline=time.monotonic() + 60)
            assert driver.find_element(By.ID, "teacher-time").text.startswith("20 steps, cpu:")
        assert not np.array_equal(*pixels)  # another prompt, another image
        # the page asked nothing of any host but the app's (no fonts, no analytics, no CDN)
        urls = {json.loads(entry["message"])["message"]["params"]["request"]["url"]
                for entry in driver.get_log("performance")
                if json.loads(entry["message"])["message"]["method"] == "Network.requestWillBeSent"}
        elsewhere = sorted(u for u in urls if not u.startswith((f"http://{HOST}:{port}/", "data:", "blob:")))
        assert urls and not elsewhere, elsewhere
        shot = Path(os.environ.get("FD_ONESTEP_DEMO_SCREENSHOT") or tmp_path / "demo.png")
        assert driver.save_screenshot(str(shot)) and Image.open(shot).size[0] > 0
        print(f"typed prompt -> image: {', '.join(f'{t:.2f} s' for t in latencies)}; screenshot {shot}")
    finally:
        driver.quit()
        demo.close()


# ------------------------------------------------------------------------------------------------ a LoRA run, a Space
def test_fd_onestep_demo_serves_an_sdxl_lora_run_with_its_base_as_the_teacher(assets, tmp_path):
    """A LoRA run's folder as the training script writes it (the LoRA file and fd_onestep_lora.json naming the base
    and the one-step settings): the page serves the base with the LoRA, and the base's own sampler beside it."""
    from fd_onestep.cli import build_parser
    from fd_onestep.demo import run_demo_command
    from fd_onestep.evaluation import LORA_INFO_FILE
    from fd_onestep.pipelines.pipeline_fd_onestep import add_lora_to_denoiser

    base, run = assets["teachers"]["sdxl"], tmp_path / "sdxl-lora"
    student = FDOneStepPipeline.from_teacher(base, timestep=500)
    add_lora_to_denoiser(student.denoiser, rank=2, init_lora_weights=False)  # random A and B: a LoRA that acts
    student.save_lora(run)
    settings = {k: student.config[k] for k in ("timestep", "prediction_type", "guidance_scale", "output_bound",
                                               "sample_size")}
    (run / LORA_INFO_FILE).write_text(json.dumps({"base_model": base, "one_step_settings": settings}))

    port = _free_port()
    args = build_parser().parse_args(["demo", str(run), "--port", str(port), "--with_teacher", "--teacher_steps", "2"])
    demo = run_demo_command(args, block=False)
    try:
        served = np.asarray(_image(port, _call(port, "generate", ["a red square", 3, 1.0])[0]))
        teacher = _call(port, "generate_teacher", ["a red square", 3, 1.0])
        assert teacher[1].startswith("**2 steps, cpu:")
        teacher_image = _image(port, teacher[0])
    finally:
        demo.close()
    import torch

    expected = student("a red square", generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    assert served.shape == expected.shape and teacher_image.size == served.shape[1::-1]
    assert np.abs(served.astype(float) - np.round(expected * 255)).max() <= 1  # the LoRA's image (8-bit PNG)


@pytest.mark.slow
def test_a_run_with_hub_space_writes_and_pushes_a_space_that_runs_with_python_app_py(script, assets, tmp_path,
                                                                                       monkeypatch):
    """``--push_to_hub --hub_space``: the Space folder in the output dir, linked from the model card, uploaded as
    the Gradio Space <repo>-demo after the model (the Hub calls captured at HfApi); ``python app.py`` in that folder
    serves the run it sits in."""
    import huggingface_hub
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoUrl
    from train_fixtures import FAST_ARGS, SUBPROCESS_ENV, encoder_args

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_from_login")
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "someone"})
    monkeypatch.setattr(huggingface_hub.ModelCard, "validate", lambda self, *a, **k: None)
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/someone/{repo_id.split('/')[-1]}")

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": sorted(
            p.name for p in Path(kwargs["folder_path"]).iterdir())}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    run = tmp_path / "my-onestep"
    script.main(script.parse_args(["--pretrained_model_name_or_path", assets["teachers"]["unet2d"],
                                   *encoder_args(assets), "--output_dir", str(run), *FAST_ARGS, "--push_to_hub",
                                   "--hub_space"]))
    (_, model_repo, _), (_, _, model_upload), (_, space_repo, space_kwargs), (_, _, space_upload) = calls
    assert model_repo == "my-onestep" and "space" in model_upload["files"]  # the model repo carries the app too
    assert space_repo == "someone/my-onestep-demo"
    assert space_kwargs["repo_type"] == "space" and space_kwargs["space_sdk"] == "gradio"
    assert space_upload["repo_type"] == "space" and space_upload["files"] == ["README.md", "app.py", "requirements.txt"]
    space = run / "space"
    assert "hub_id='someone/my-onestep'" in (space / "app.py").read_text()
    front = huggingface_hub.SpaceCard.load(space / "README.md").data  # the Hub's own parser of the front matter
    assert (front.sdk, front.app_file, front.models) == ("gradio", "app.py", ["someone/my-onestep"])
    assert front.title == "my-onestep: one step" and front.sdk_version == gr.__version__
    assert (space / "requirements.txt").read_text().startswith("fd-onestep[demo]")
    card = (run / "README.md").read_text()
    assert "https://huggingface.co/spaces/someone/my-onestep-demo" in card and "python space/app.py" in card

    # `python app.py`, as a Space runs it; here it finds the run it was written into (an unconditional model)
    port = _free_port()
    env = {**SUBPROCESS_ENV, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": HOST,
           "GRADIO_TEMP_DIR": os.environ["GRADIO_TEMP_DIR"]}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_port(port, proc)
        outputs = _call(port, "generate", [5])  # the seed: no prompt, no class, no guidance
        assert _image(port, outputs[0]).size == (16, 16)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_hub_id_of_a_lora_run_is_fetched_as_its_lora_and_its_info_for_the_loader(monkeypatch, tmp_path):
    import huggingface_hub

    from fd_onestep.demo import _resolve_run

    calls = []

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append(("file", repo_id, filename))
        if repo_id != "someone/lora-run":
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(tmp_path / filename)

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(("snapshot", repo_id, tuple(allow_patterns)))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert _resolve_run("someone/lora-run") == str(tmp_path)  # a local folder the loader reads the base from
    assert calls == [("file", "someone/lora-run", "fd_onestep_lora.json"),
                     ("snapshot", "someone/lora-run", ("fd_onestep_lora.json", "pytorch_lora_weights.safetensors"))]
    assert _resolve_run("someone/full-run") == "someone/full-run"  # a pipeline repo: diffusers fetches what it needs
    assert _resolve_run(str(tmp_path)) == str(tmp_path)  # a local folder as is


def test_the_demo_command_names_bad_input_before_serving(digits_runs, tmp_path, capsys):
    from fd_onestep.cli import main
    from fd_onestep.demos.digits import TEXT_TEACHER_PATH

    assert main(["demo", str(tmp_path / "missing")]) == 2
    assert "Could not load the pipeline" in capsys.readouterr().err
    assert main(["demo", str(TEXT_TEACHER_PATH)]) == 2  # a multi-step teacher is not a one-step generator
    assert "is a multi-step StableDiffusionPipeline" in capsys.readouterr().err
    assert main(["demo", str(digits_runs["text"]), "--with_teacher"]) == 2  # a folder that names no teacher
    assert "pass it with --teacher" in capsys.readouterr().err
