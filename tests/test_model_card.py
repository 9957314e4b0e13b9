"""The model card of a trained one-step pipeline: rendered from model_card_template.md through
huggingface_hub's ModelCard, no template placeholders left, metadata the Hub accepts, and the Hub's own
validation request carrying exactly that card (the network call itself is replaced)."""

import re

import pytest
from huggingface_hub import ModelCard

from fd_onestep.training.model_card import MODEL_CARD_TEMPLATE, check_model_card, render_model_card

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


def test_template_is_the_repository_root_file():
    assert MODEL_CARD_TEMPLATE.name == "model_card_template.md" and MODEL_CARD_TEMPLATE.is_file()
    assert "{{ card_data }}" in MODEL_CARD_TEMPLATE.read_text()


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
    text = str(_card(lora=True, conditioning="text", base_model="some/sd-model", model_family="sd"))
    assert 'FDOneStepPipeline.from_teacher("some/sd-model")' in text and "load_lora_weights" in text
    data = ModelCard(text).data.to_dict()
    assert "lora" in data["tags"] and data["pipeline_tag"] == "text-to-image"


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
