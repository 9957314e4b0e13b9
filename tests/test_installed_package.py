"""The package as a user installs it: a wheel built from this checkout, installed (not editable) into a fresh
venv, and the training script run from the checkout with that venv's python writes its model card.

The venv gets the test environment's dependencies (torch, diffusers, ...) through a ``.pth`` file listing
their site-packages folders as plain paths. That is not ``--system-site-packages``: the ``.pth`` files *inside*
those folders are not run, so the checkout's editable install (a meta-path finder installed by such a
``.pth``) cannot stand in for the wheel; the only ``fd_onestep`` the venv can import is the wheel's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from train_fixtures import FAST_ARGS, REPO_ROOT, SCRIPT, SUBPROCESS_ENV, encoder_args

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pytest itself depends on tomli before Python 3.11
    import tomli as tomllib

pytestmark = pytest.mark.slow

# offline, and no stray path of the test process (the checkout on PYTHONPATH would defeat the test)
ENV = {k: v for k, v in SUBPROCESS_ENV.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
PIP_ENV = {**ENV, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1", "PIP_NO_INPUT": "1"}


def _run(cmd, *, cwd, env=ENV, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n--- stdout\n"
                             f"{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-12000:]}")
    return proc


def _sdist_tree(dest: Path) -> Path:
    """What a build of the package reads: pyproject.toml, its readme, and the folders of its package-dir
    (copied, so that building writes no build/ or egg-info into the checkout)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", project["project"]["readme"]):
        shutil.copy2(REPO_ROOT / name, dest / name)
    for folder in sorted(set(project["tool"]["setuptools"]["package-dir"].values())):
        shutil.copytree(REPO_ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _dependency_paths() -> list[str]:
    """The site-packages folders the test environment imports its dependencies from."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def fresh_venv(path: Path) -> Path:
    """A venv without pip or fd_onestep that imports the test environment's dependencies; its python."""
    _run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent)
    python = path / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path).stdout.strip()
    Path(purelib, "_test_dependencies.pth").write_text("\n".join(_dependency_paths()) + "\n")
    return python


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout (``pip wheel --no-deps``)."""
    root = tmp_path_factory.mktemp("wheel")
    source = _sdist_tree(root / "source")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", source, "-w", root / "dist"],
         cwd=root, env=PIP_ENV)
    (built,) = (root / "dist").glob("fd_onestep-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_python(wheel, tmp_path_factory):
    """The python of a fresh venv with the wheel of this checkout installed (``pip install --no-deps``)."""
    root = tmp_path_factory.mktemp("installed")
    python = fresh_venv(root / "venv")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel], cwd=root, env=PIP_ENV)
    return python, root / "venv"


DEMO_ASSETS = "fd_onestep/demos/digits/assets/"
ASSETS_CEILING_BYTES = 24 * 1024**2


def test_the_wheel_ships_what_the_demos_run_on_and_no_logs_or_sample_images(wheel):
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        files = {info.filename: info.file_size for info in archive.infolist()}
    for needed in ("teacher/model_index.json", "teacher-class/unet/diffusion_pytorch_model.safetensors",
                   "teacher-text/tokenizer/vocab.json", "encoders/resnet-digits/model.safetensors",
                   "stats/pixels-digits.classes.safetensors", "split.json"):
        assert DEMO_ASSETS + needed in files, needed
    assert "fd_onestep/demos/digits/recipes.py" in files
    unwanted = [name for name in files if name.endswith((".png", ".jpg", ".jpeg", "_log.json", ".md"))
                and not name.endswith("model_card_template.md")]
    assert not unwanted, f"the wheel carries records or pictures: {unwanted}"
    assert not [name for name in files if name.startswith(("results/", "docs/", "fd_onestep/assets/"))]
    assets = sum(size for name, size in files.items() if name.startswith(DEMO_ASSETS))
    assert assets <= ASSETS_CEILING_BYTES, f"demo assets {assets / 1024**2:.1f} MiB"


def test_the_installed_demo_finds_its_assets(wheel_python, tmp_path):
    python, venv = wheel_python
    code = ("import json; from fd_onestep.demos import digits; from fd_onestep.demos.digits.recipes import RECIPES;"
            "paths = [digits.TEACHER_PATH, digits.classifier_path(), *map(digits.stats_path, digits.TRAINING_ENCODERS)];"
            "paths += [p for r in RECIPES.values() for p in r['reference_stats'] + r['eval_reference_stats']];"
            "print(json.dumps([[str(p), __import__('pathlib').Path(p).exists()] for p in paths]))")
    for path, exists in json.loads(_run([python, "-c", code], cwd=tmp_path).stdout):
        assert exists and Path(path).resolve().is_relative_to(venv.resolve()), path


def test_the_venv_imports_the_wheel_not_the_checkout(wheel_python, tmp_path):
    python, venv = wheel_python
    code = ("import importlib.util, json, fd_onestep, fd_onestep.training.model_card as m;"  # no torch import: quick
            "p = importlib.util.find_spec('fd_onestep.pipelines.pipeline_fd_onestep').origin;"
            "print(json.dumps([fd_onestep.__file__, p, str(m.MODEL_CARD_TEMPLATE), m.MODEL_CARD_TEMPLATE.is_file()]))")
    package, pipeline, template, template_found = json.loads(_run([python, "-c", code], cwd=tmp_path).stdout)
    for path in (package, pipeline, template):
        assert Path(path).resolve().is_relative_to(venv.resolve()), path
    assert template_found


def test_training_script_from_the_checkout_writes_the_model_card_with_the_installed_package(wheel_python, assets,
                                                                                             tmp_path):
    python, _ = wheel_python
    out = tmp_path / "out"
    _run([python, SCRIPT, "--pretrained_model_name_or_path", assets["teachers"]["unet2d"], *encoder_args(assets),
          "--output_dir", out, *FAST_ARGS, "--checkpointing_steps", "0"], cwd=REPO_ROOT, timeout=600)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and "FDOneStepPipeline.from_pretrained" in card.text
    assert (out / "model_index.json").is_file() and (out / "pipeline_fd_onestep.py").is_file()


def test_training_script_without_the_package_says_how_to_install_it(tmp_path):
    python = fresh_venv(tmp_path / "venv")
    proc = subprocess.run([str(python), str(SCRIPT), "--help"], cwd=REPO_ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "pip install -e ." in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
