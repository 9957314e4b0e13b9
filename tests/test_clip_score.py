"""CLIP score (fd_onestep.clip_score), the bundled digits CLIP, and the text-to-image protocol of `fd-onestep evaluate`."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fd_onestep.clip_score import CLIPScore, clip_score, clip_scores, load_clip_model
from fd_onestep.demos.digits import (
    CLIP_PATH,
    HELD_OUT_PHRASINGS,
    TEXT_TEACHER_PATH,
    clip_ranking_accuracy,
    classifier_path,
    digit_prompt,
    encoder_path,
    load_digits_split,
    write_digits_text_dataset,
)
from fd_onestep.images import tensor_to_pil


@pytest.fixture(scope="module")
def clip():
    return load_clip_model(CLIP_PATH, local_files_only=True)


@pytest.fixture(scope="module")
def clip64(clip):
    """The same model in float64: the library and the hand computation then agree far below 1e-5 whatever the
    batching (in float32, scores near 85 differ by their last bits, ~1e-5)."""
    import copy

    return copy.deepcopy(clip[0]).double(), clip[1]


@pytest.fixture(scope="module")
def pairs():
    """Held-out digits with prompts of their own digit (first half) and of the next digit (second half)."""
    images, labels = load_digits_split("validation")
    images, labels = images[:12], labels[:12]
    prompts = [digit_prompt(int(c) if i < 6 else (int(c) + 1) % 10, "the digit {word}") for i, c in enumerate(labels)]
    return images, prompts


def _by_hand(images, prompts, model, processor):
    """The definition written out with the model's forward (not get_*_features): max(100 cos, 0) per pair."""
    inputs = processor(text=prompts, images=tensor_to_pil(images), padding=True, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        out = model(**inputs)
    cos = (out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
           * (out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True))).sum(-1)
    return (100 * cos).clamp(min=0)


def test_clip_score_equals_the_hand_computation_with_the_same_model(clip64, pairs):
    model, processor = clip64
    images, prompts = pairs
    expected = _by_hand(images, prompts, model, processor)
    assert (expected > 0).any(), "a test of the score needs some positive pairs"
    assert torch.allclose(clip_scores(images, prompts, model, processor, batch_size=5), expected, atol=1e-5, rtol=0)
    assert clip_score(images, prompts, model, processor) == pytest.approx(float(expected.mean()), abs=1e-5)
    # the accumulator over uneven batches gives the same mean and counts every pair
    scorer = CLIPScore(model, processor, name="clip-digits")
    scorer.update(images[:7], prompts[:7]).update(images[7:], prompts[7:])
    assert scorer.count == 12 and scorer.compute() == pytest.approx(float(expected.mean()), abs=1e-5)


def test_clip_score_agrees_with_torchmetrics_on_a_local_clip_folder(clip, pairs):
    from torchmetrics.functional.multimodal import clip_score as torchmetrics_clip_score

    model, processor = clip
    images, prompts = pairs

    class FeatureTensors(torch.nn.Module):
        """transformers >= 5 returns model outputs from get_*_features; torchmetrics 1.9 expects tensors."""

        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.model.get_text_features(*args, **kwargs).pooler_output

    uint8 = [torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in tensor_to_pil(images)]
    # torchmetrics clips the mean of a call: one pair per call gives the per-pair score
    theirs = torch.stack([torchmetrics_clip_score(uint8[i], prompts[i], lambda: (FeatureTensors(model), processor))
                          for i in range(len(prompts))])
    assert torch.allclose(clip_scores(images, prompts, model, processor).float(), theirs.float(), atol=1e-4, rtol=0)


def test_a_model_without_a_text_tower_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="no text tower"):
        load_clip_model(encoder_path("dinov2-digits"), local_files_only=True)


def test_one_prompt_per_image(clip, pairs):
    images, prompts = pairs
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_scores(images, prompts[:-1], *clip)


def test_the_bundled_digits_clip_ranks_matching_prompts_above_mismatched_ones_on_held_out_images(clip):
    """Held-out images (never trained on) in the held-out phrasings (never trained on); the record states the
    accuracy on all 360 (results/digits-assets/clip-digits_training_log.json)."""
    images, labels = load_digits_split("validation")
    result = clip_ranking_accuracy(images[:120], labels[:120], *clip, phrasings=HELD_OUT_PHRASINGS)
    assert result["pairwise"] >= 0.95 and result["top1"] >= 0.8
    shuffled = clip_ranking_accuracy(images[:120], labels[:120].roll(1), *clip, phrasings=HELD_OUT_PHRASINGS)
    assert shuffled["pairwise"] < 0.5  # the same images with other digits' labels: the ranking is about the digit


def test_the_text_to_image_protocol_reports_every_number_with_its_count_for_the_run_and_its_teacher(tmp_path, monkeypatch):
    """`fd-onestep evaluate --pipeline RUN --dataset D --caption_column C`: FD, FDr, FD_r^k, CLIP score and
    adherence for the one-step pipeline and the teacher at K steps; the reference statistics are cached."""
    from fd_onestep.cli import main
    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

    FDOneStepPipeline.from_teacher(str(TEXT_TEACHER_PATH), local_files_only=True).save_pretrained(tmp_path / "run")
    write_digits_text_dataset(tmp_path / "data", max_rows=16)
    cache, out = tmp_path / "cache", tmp_path / "protocol.json"
    args = ["evaluate", "--pipeline", str(tmp_path / "run"), "--dataset", str(tmp_path / "data"), "--caption_column",
            "text", "--label_column", "label", "--classifier", str(classifier_path()), "--validation_split",
            "validation", "--num_samples", "16", "--batch_size", "8", "--encoders", "pixels-gray:16",
            "--clip_model", str(CLIP_PATH), "--teacher", str(TEXT_TEACHER_PATH), "--teacher_steps", "2",
            "--reference_cache", str(cache), "--output", str(out), "--local_files_only"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["protocol"]["num_rows"] == 16 and report["protocol"]["caption_column"] == "text"
    assert list(report["generators"]) == ["one step", "teacher, 2 steps"]
    for result in report["generators"].values():
        rep = result["representations"]["pixels-gray_16"]
        assert rep["num_samples"] == 16 and rep["reference_num_samples"] == 16 and rep["fd_r"] is not None
        assert result["fd_r_k"] == pytest.approx(rep["fd_r"]) and result["k"] == 1
        assert result["clip_score"]["num_samples"] == 16 and 0 <= result["clip_score"]["score"] <= 100
        assert result["conditioning"]["adherence"] is not None
    # the same rows again: the reference statistics come from the cache, nothing is encoded
    import fd_onestep.dataset_stats
    from fd_onestep.encoders import load_encoder
    from fd_onestep.evaluation import captioned_reference_stats, read_captioned_rows

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached reference statistics were recomputed")

    monkeypatch.setattr(fd_onestep.dataset_stats, "compute_reference_stats", must_not_run)
    rows = read_captioned_rows(tmp_path / "data", caption_column="text", num_samples=16, validation_split="validation")
    assert rows.captions[0] and rows.content_hash == report["protocol"]["content_hash"]
    cached = captioned_reference_stats({"pixels-gray_16": load_encoder("pixels-gray:16")}, rows, cache=cache)
    rep = report["generators"]["one step"]["representations"]["pixels-gray_16"]
    assert cached["pixels-gray_16"].validation_fd == pytest.approx(rep["validation_fd"])


def test_the_protocol_names_a_missing_caption_column_before_loading_models(tmp_path, capsys):
    from fd_onestep.cli import main

    write_digits_text_dataset(tmp_path / "data", max_rows=4)
    assert main(["evaluate", "--pipeline", str(tmp_path / "missing"), "--dataset", str(tmp_path / "data"),
                 "--caption_column", "caption", "--encoders", "pixels-gray:16", "--num_samples", "4"]) != 0
    assert "'caption' is not a column" in capsys.readouterr().err
