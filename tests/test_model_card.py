"""The model card of a trained one-step pipeline: rendered from model_card_template.md (package data)
through huggingface_hub's ModelCard, no template placeholders left, metadata the Hub accepts, the Hub's own
validation request carrying exactly that card (the network call itself is replaced), and snippets that work
as written (run here on tiny saved pipelines and LoRAs, offline)."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from fd_onestep.training import model_card
from fd_onestep.training.model_card import MODEL_CARD_TEMPLATE, check_model_card, render_model_card

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pytest itself depends on tomli before Python 3.11
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]

ENCODERS = [
    {"name": "dinov2", "encoder_id": "dinov2:dinov2-base:cls:224", "feature_dim": 768, "weight": 1.0,
     "stats": "dinov2.safetensors (50000 images, imagenet)"},
    {"name": "siglip", "encoder_id": "siglip:siglip-base:pooler:224", "feature_dim": 768, "weight": 0.5,
     "stats": "siglip.safetensors (50000 images)"},
]
EVAL = [{"name": "inception", "encoder_id": "inception-v3-fid:pool3", "feature_dim": 2048, "stats": "fid.npz (50000 images)"}]
FDS = [
    {"encoder": "dinov2", "in_loss": True, "population_fd": 12.5, "fresh_fd": 14.25, "fd_r": 3.1},
    {"encoder": "siglip", "in_loss": True, "population_fd": 0.04, "fresh_fd": 0.05, "fd_r": None},
    {"encoder": "inception", "in_loss": False, "population_fd": None, "fresh_fd": 8.0, "fd_r": 2.0},
]


def _card(**overrides):
    kwargs = dict(base_model="google/ddpm-cifar10-32", model_family="unet2d", encoders=ENCODERS, eval_encoders=EVAL,
                  training={"steps": 1000, "samples per update": 256}, final_fds=FDS, sample_grid="validation_grid.png",
                  repo_id="me/ddpm-onestep", lora=False, conditioning="unconditional")
    kwargs.update(overrides)
    return render_model_card(**kwargs)


def test_template_is_package_data_next_to_the_module():
    """Installed from a wheel, only package data travels: the template lives in fd_onestep/training/ and
    pyproject's package-data names it (tests/test_installed_package.py installs the wheel and renders it)."""
    assert MODEL_CARD_TEMPLATE.name == "model_card_template.md" and MODEL_CARD_TEMPLATE.is_file()
    assert "{{ card_data }}" in MODEL_CARD_TEMPLATE.read_text()
    assert Path(str(MODEL_CARD_TEMPLATE)).parent == Path(model_card.__file__).parent
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "model_card_template.md" in package_data["fd_onestep.training"]


def test_card_renders_every_section_with_no_placeholder_left():
    text = str(_card())
    assert not re.search(r"\{\{|\}\}|\{%|%\}", text)
    for expected in ("google/ddpm-cifar10-32", "dinov2:dinov2-base:cls:224", "inception-v3-fid:pool3",
                     "| steps | 1000 |", "| dinov2 | yes | 12.5 | 14.25 | 3.1 |", "| inception | no | - | 8 | 2 |",
                     "![one-step samples](validation_grid.png)", 'FDOneStepPipeline.from_pretrained("me/ddpm-onestep")'):
        assert expected in text, expected


def test_card_metadata_is_what_the_hub_expects_for_a_diffusers_model():
    card = ModelCard(str(_card()))
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers"
    assert data["base_model"] == "google/ddpm-cifar10-32"
    assert data["pipeline_tag"] == "unconditional-image-generation"
    assert {"diffusers", "fd-onestep", "one-step"} <= set(data["tags"])


def test_lora_card_says_how_to_load_the_lora_on_its_base():
    text = str(_card(lora=True, conditioning="text", base_model="some/sd-model", model_family="sd",
                     one_step_settings={"timestep": 999, "prediction_type": "v_prediction", "guidance_scale": 2.0,
                                        "output_bound": None, "sample_size": 64}))
    assert 'FDOneStepPipeline.from_teacher(\n    "some/sd-model",\n' in text and "load_lora_weights" in text
    assert "timestep=999, prediction_type='v_prediction', guidance_scale=2.0, output_bound=None, sample_size=64" in text
    data = ModelCard(text).data.to_dict()
    assert "lora" in data["tags"] and data["pipeline_tag"] == "text-to-image"


def test_lora_card_without_the_one_step_settings_is_an_error():
    with pytest.raises(ValueError, match="one_step_settings"):
        _card(lora=True)


def test_local_path_base_model_is_not_put_in_hub_metadata():
    data = ModelCard(str(_card(base_model="/tmp/some/local/folder"))).data.to_dict()
    assert "base_model" not in data  # the Hub rejects base_model values that are not repo ids


def test_card_without_validation_results_still_renders_cleanly():
    text = str(_card(final_fds=[], eval_encoders=[], sample_grid=None))
    assert "Fréchet distances of the final model" not in text and "Held-out" not in text
    check_model_card(ModelCard(text))


def test_leftover_placeholder_is_detected():
    broken = ModelCard("---\nlibrary_name: diffusers\n---\n# x\n{{ forgotten }}\n")
    with pytest.raises(ValueError, match="placeholders"):
        check_model_card(broken)


def test_hub_validation_request_carries_the_rendered_card(monkeypatch):
    """``ModelCard.validate`` posts the card to the Hub; the request is captured instead of sent."""
    import huggingface_hub.repocard as repocard

    sent = {}

    class FakeResponse:
        status_code = 200
        text = ""

        def raise_for_status(self):
            return None

    class FakeSession:
        def post(self, url, json=None, headers=None, **kwargs):
            sent.update(url=url, body=json)
            return FakeResponse()

    monkeypatch.setattr(repocard, "get_session", lambda: FakeSession())
    monkeypatch.setattr(repocard, "hf_raise_for_status", lambda response: None)
    card = _card()
    card.validate()
    assert sent["url"].endswith("/api/validate-yaml")
    assert sent["body"] == {"repoType": "model", "content": str(card)}


# ------------------------------------------------------------------- what users copy works as written
def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _run(code: str) -> dict:
    namespace: dict = {}
    exec(compile(code, "<model card snippet>", "exec"), namespace)  # the card's code, exactly as rendered
    return namespace


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from test_pipeline_tiny_models import ddpm_teacher

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "ddpm"
    ddpm_teacher().save_pretrained(path)
    return path


SAMPLE = 'pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images'


def test_both_snippets_of_a_pipeline_card_load_the_saved_folder(teacher_dir, tmp_path):
    """The fd-onestep snippet and the no-install one (stock diffusers, ``custom_pipeline`` naming the file the
    folder carries) load the saved folder and generate the same images."""
    from fd_onestep import FDOneStepPipeline

    pipe = FDOneStepPipeline.from_teacher(teacher_dir, timestep=600, output_bound="tanh")
    out = tmp_path / "onestep"
    pipe.save_pretrained(out)
    expected = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    text = str(_card(repo_id=str(out), example_call=SAMPLE))
    blocks = _python_blocks(text)
    assert len(blocks) == 2 and "DiffusionPipeline.from_pretrained" in blocks[1]
    ours, stock = _run(blocks[0]), _run(blocks[1])
    assert type(ours["pipe"]) is FDOneStepPipeline
    assert type(stock["pipe"]).__name__ == "FDOneStepPipeline" and type(stock["pipe"]) is not FDOneStepPipeline
    for ns in (ours, stock):
        assert torch.equal(ns["images"], expected)


def test_lora_card_snippet_rebuilds_the_generator_the_lora_was_trained_on(teacher_dir, tmp_path):
    """The LoRA snippet passes the one-step settings of the run to ``from_teacher``: the same generator comes
    out (without them it is another one: the default timestep and no output bound)."""
    from fd_onestep import FDOneStepPipeline
    from fd_onestep.pipelines.pipeline_fd_onestep import add_lora_to_denoiser

    settings = {"timestep": 600, "prediction_type": "v_prediction", "guidance_scale": 1.0, "output_bound": "tanh",
                "sample_size": 16}
    pipe = FDOneStepPipeline.from_teacher(teacher_dir, **settings)
    add_lora_to_denoiser(pipe.denoiser, rank=4, init_lora_weights=False)  # non-zero: a trained LoRA
    out = tmp_path / "lora"
    pipe.save_lora(out)
    expected = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    text = str(_card(lora=True, base_model=str(teacher_dir), repo_id=str(out), example_call=SAMPLE,
                     one_step_settings=settings))
    (block,) = _python_blocks(text)
    assert "# the teacher folder on the training machine" in block
    assert torch.allclose(_run(block)["images"], expected, atol=1e-6)
    untuned = FDOneStepPipeline.from_teacher(teacher_dir)
    untuned.load_lora_weights(out)
    other = untuned(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert (other - expected).abs().max() > 1e-2  # what today's snippet built


def test_text_lora_card_shows_the_stock_pipeline_recipe_and_it_takes_the_same_one_step(tmp_path):
    """A Stable Diffusion LoRA card has a second snippet without fd-onestep: stock StableDiffusionPipeline, the
    LoRA, a DDIM scheduler set up by stock_one_step(); run as written it gives FDOneStepPipeline's images."""
    from test_lora_fd_onestep import trained_lora
    from test_pipeline_tiny_models import TEACHERS

    from fd_onestep import FDOneStepPipeline

    torch.manual_seed(0)
    TEACHERS["sd"]().save_pretrained(tmp_path / "sd")
    settings = {"timestep": 500, "output_bound": "clamp", "guidance_scale": 2.0}
    pipe = FDOneStepPipeline.from_teacher(tmp_path / "sd", **settings)
    trained_lora(pipe)
    pipe.save_lora(tmp_path / "lora")
    recipe = pipe.stock_one_step()
    card_recipe = {"pipeline": recipe["pipeline"], "scheduler": type(recipe["scheduler"]).__name__,
                   "scheduler_overrides": recipe["scheduler_overrides"], "call_kwargs": recipe["call_kwargs"]}
    text = str(_card(lora=True, base_model=str(tmp_path / "sd"), model_family="sd", conditioning="text",
                     repo_id=str(tmp_path / "lora"), one_step_settings=settings, stock_recipe=card_recipe))
    blocks = _python_blocks(text)
    assert len(blocks) == 2 and "StableDiffusionPipeline.from_pretrained" in blocks[1]
    assert "DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing='leading', steps_offset=500" in blocks[1]
    stock = _run(blocks[1])["pipe"]
    stock.set_progress_bar_config(disable=True)
    expected = pipe("a cab", generator=torch.Generator().manual_seed(3), output_type="pt").images
    got = stock("a cab", generator=torch.Generator().manual_seed(3), output_type="pt", **recipe["call_kwargs"]).images
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


# ------------------------------------------------------------------- license and base model from the teacher
def _write_card(folder: Path, **metadata) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{k}: {v}" for k, v in metadata.items()]
    (folder / "README.md").write_text("---\n" + "\n".join(lines) + "\n---\n# a teacher\n")


def test_license_comes_from_the_teacher_card(tmp_path):
    _write_card(tmp_path / "sd", license="creativeml-openrail-m", library_name="diffusers")
    found = model_card.teacher_license(tmp_path / "sd")
    assert found == {"license": "creativeml-openrail-m"}
    assert ModelCard(str(_card(**found))).data.to_dict()["license"] == "creativeml-openrail-m"


def test_relative_license_link_becomes_the_teacher_repos_file(tmp_path):
    _write_card(tmp_path / "sd3", license="other", license_name="stabilityai-ai-community", license_link="LICENSE.md")
    found = model_card.teacher_license(tmp_path / "sd3", hub_id="stabilityai/stable-diffusion-3-medium-diffusers")
    assert found == {"license": "other", "license_name": "stabilityai-ai-community",
                     "license_link": "https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers/resolve/main/LICENSE.md"}
    data = ModelCard(str(_card(**found))).data.to_dict()
    assert data["license_name"] == "stabilityai-ai-community" and data["license_link"] == found["license_link"]
    # no Hub id: a link into a repo we cannot name is dropped
    assert model_card.teacher_license(tmp_path / "sd3") == {"license": "other", "license_name": "stabilityai-ai-community"}


def test_license_of_a_hub_teacher_is_read_from_its_cached_card(tmp_path):
    """A Hub teacher's card comes through ``hf_hub_download`` (here from a cache laid out as huggingface_hub
    lays it out, offline)."""
    repo = tmp_path / "cache" / "models--org--teacher"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    _write_card(repo / "snapshots" / "0123abcd", license="openrail++")
    found = model_card.teacher_license("org/teacher", hub_id="org/teacher", cache_dir=tmp_path / "cache",
                                       local_files_only=True)
    assert found == {"license": "openrail++"}


def test_unknown_license_is_other(tmp_path):
    (tmp_path / "bare").mkdir()
    assert model_card.teacher_license(tmp_path / "bare") == {"license": "other"}
    # a Hub teacher whose card is neither cached nor reachable (the suite runs with HF_HUB_OFFLINE=1)
    assert model_card.teacher_license("fd-onestep-tests/never-cached-teacher") == {"license": "other"}
    assert ModelCard(str(_card())).data.to_dict()["license"] == "other"


def _teacher_folder(path: Path, name_or_path: str | None) -> Path:
    (path / "unet").mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}))
    config = {"_class_name": "UNet2DModel"} | ({"_name_or_path": name_or_path} if name_or_path else {})
    (path / "unet" / "config.json").write_text(json.dumps(config))
    return path


def test_hub_id_of_a_local_teacher_where_it_is_known(tmp_path):
    hub_id = model_card.teacher_hub_id
    assert hub_id("google/ddpm-cifar10-32") == "google/ddpm-cifar10-32"
    snapshot = _teacher_folder(tmp_path / "hub" / "models--google--ddpm-cifar10-32" / "snapshots" / "abc123", None)
    assert hub_id(snapshot) == "google/ddpm-cifar10-32"
    assert hub_id(_teacher_folder(tmp_path / "a", "google/ddpm-cifar10-32")) == "google/ddpm-cifar10-32"
    loaded_with_pipeline = "/root/.cache/huggingface/hub/models--org--teacher/snapshots/0f1e/unet"
    assert hub_id(_teacher_folder(tmp_path / "b", loaded_with_pipeline)) == "org/teacher"
    assert hub_id(_teacher_folder(tmp_path / "c", str(tmp_path / "elsewhere"))) is None  # a local path: unknown
    assert hub_id(_teacher_folder(tmp_path / "d", None)) is None


def test_local_teacher_with_a_known_hub_id_records_it_in_metadata_and_text():
    text = str(_card(base_model="/data/teachers/ddpm", base_model_id="google/ddpm-cifar10-32"))
    assert ModelCard(text).data.to_dict()["base_model"] == "google/ddpm-cifar10-32"
    assert "`/data/teachers/ddpm`" in text and "(https://huggingface.co/google/ddpm-cifar10-32)" in text


# ------------------------------------------------------------------- the run's comparison
def test_comparison_grid_and_table_are_in_the_card():
    # a comparison.md as the training script's comparison writes it (fixed here: docs/ changes with each run)
    table = (
        "FD of 1000 samples per generator against the reference statistics (seed 0).\n\n"
        "| generator | FD dinov2-digits | FD_r dinov2-digits |\n|---|---:|---:|\n"
        "| teacher, 1 step (naive) | 108.1 | 864.8 |\n| student, 1 step (FD-loss) | 0.350 | 2.796 |\n"
    )
    text = str(_card(comparison_grid="comparison_grid.png", comparison_table=table))
    assert "## Teacher vs student" in text and "![teacher vs student](comparison_grid.png)" in text
    assert "| student, 1 step (FD-loss) | 0.350 |" in text and "| teacher, 1 step (naive) | 108.1 |" in text
    assert "Teacher vs student" not in str(_card())
