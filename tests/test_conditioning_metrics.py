"""Specification of adherence, per-class FD and the Fréchet Joint Distance (fd_onestep.conditioning_metrics),
of per-class reference statistics from a labeled dataset (`fd-onestep stats --label_column`) and of their report
by `fd-onestep evaluate` for a class-conditional pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fd_onestep.conditioning_metrics import (
    AdherenceCounter,
    ClassConditionalMoments,
    ClassConditionalStats,
    adherence,
    frechet_joint_distance,
    joint_features,
    joint_moments,
    label_embedding_scale,
    per_class_frechet_distances,
)
from fd_onestep.frechet import frechet_distance
from fd_onestep.moments import FeatureMoments
from fd_onestep.reference_stats import ReferenceStats

NUM_CLASSES = 3
DIM = 4


def _np_fd(reference: np.ndarray, generated: np.ndarray) -> float:
    """frechet_distance of numpy's mean and unbiased covariance of two (N, d) float64 arrays."""
    return float(frechet_distance(reference.mean(0), np.cov(reference, rowvar=False),
                                  generated.mean(0), np.cov(generated, rowvar=False)))


def _class_data(n_per_class: int, seed: int, shift: float = 3.0):
    """(N, DIM) float64 features whose mean depends on the class (class c centred at shift * e_c), balanced labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    means = torch.zeros(NUM_CLASSES, DIM, dtype=torch.float64)
    means[torch.arange(NUM_CLASSES), torch.arange(NUM_CLASSES)] = shift
    return torch.randn(len(labels), DIM, generator=g, dtype=torch.float64) + means[labels], labels


def _moments(features, labels) -> ClassConditionalMoments:
    return ClassConditionalMoments(features.shape[1], NUM_CLASSES).update(features, labels)


def _reference(features, labels, alpha=None) -> ClassConditionalStats:
    return ClassConditionalStats.from_moments(_moments(features, labels), alpha=alpha, encoder_id="test-encoder")


def _one_hot(labels) -> np.ndarray:
    return np.eye(NUM_CLASSES)[labels.numpy()]


# ----------------------------------------------------------------------------------------------- adherence
def test_adherence_is_the_share_of_samples_classified_as_requested():
    predicted = torch.tensor([0, 1, 2, 2, 1])
    requested = torch.tensor([0, 1, 1, 2, 0])
    assert adherence(predicted, requested) == pytest.approx(3 / 5)
    assert adherence(requested, requested) == 1.0
    counter = AdherenceCounter().update(predicted[:2], requested[:2]).update(predicted[2:], requested[2:])
    assert (counter.correct, counter.total) == (3, 5) and counter.compute() == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="entries for 5 samples"):
        adherence(predicted[:4], requested)
    with pytest.raises(ValueError, match="integer"):
        adherence(predicted.float(), requested)


# ----------------------------------------------------------------------------------------------- per-class FD, FJD
def test_per_class_fd_is_the_mean_of_the_per_class_frechet_distances_computed_directly():
    ref_feats, ref_labels = _class_data(60, seed=0)
    gen_feats, gen_labels = _class_data(40, seed=1, shift=2.0)
    distances = per_class_frechet_distances(_moments(gen_feats, gen_labels), _reference(ref_feats, ref_labels))
    assert sorted(distances) == list(range(NUM_CLASSES))
    for c in range(NUM_CLASSES):
        expected = _np_fd(ref_feats[ref_labels == c].numpy(), gen_feats[gen_labels == c].numpy())
        assert distances[c] == pytest.approx(expected, rel=1e-9)
    # only the classes that were generated count
    some = gen_labels != 1
    assert sorted(per_class_frechet_distances(_moments(gen_feats[some], gen_labels[some]),
                                              _reference(ref_feats, ref_labels))) == [0, 2]


def test_default_alpha_gives_the_label_block_the_trace_of_the_feature_block():
    ref_feats, ref_labels = _class_data(50, seed=0)
    ref_labels = ref_labels.clone()
    ref_labels[:20] = 2  # unbalanced classes
    alpha = _reference(ref_feats, ref_labels).alpha
    label_trace = np.trace(np.cov(alpha * _one_hot(ref_labels), rowvar=False))
    assert label_trace == pytest.approx(np.trace(np.cov(ref_feats.numpy(), rowvar=False)), rel=1e-12)
    assert alpha == pytest.approx(label_embedding_scale(float(np.trace(np.cov(ref_feats.numpy(), rowvar=False))),
                                                        torch.bincount(ref_labels)), rel=1e-12)


@pytest.mark.parametrize("alpha", [None, 0.7])
def test_fjd_is_the_frechet_distance_of_the_concatenated_features_and_scaled_one_hots(alpha):
    ref_feats, ref_labels = _class_data(60, seed=0)
    gen_feats, gen_labels = _class_data(40, seed=1, shift=2.0)
    reference = _reference(ref_feats, ref_labels, alpha=alpha)
    if alpha is not None:
        assert reference.alpha == alpha
    a = reference.alpha
    ref_joint = np.concatenate([ref_feats.numpy(), a * _one_hot(ref_labels)], axis=1)
    gen_joint = np.concatenate([gen_feats.numpy(), a * _one_hot(gen_labels)], axis=1)
    assert np.allclose(joint_features(gen_feats, gen_labels, NUM_CLASSES, a).numpy(), gen_joint)
    fjd = frechet_joint_distance(_moments(gen_feats, gen_labels), reference)
    assert fjd == pytest.approx(_np_fd(ref_joint, gen_joint), rel=1e-9)
    # the joint moments from per-class moments are those of the joint vectors
    direct = FeatureMoments.from_features(torch.from_numpy(gen_joint))
    joint = joint_moments(_moments(gen_feats, gen_labels), a)
    assert joint.count == direct.count
    assert torch.allclose(joint.mean, direct.mean, rtol=0, atol=1e-12)
    assert torch.allclose(joint.covariance(), direct.covariance(), rtol=0, atol=1e-12)


def test_fjd_and_per_class_fd_are_zero_for_the_same_joint_distribution():
    feats, labels = _class_data(50, seed=0)
    reference = _reference(feats, labels)
    generated = _moments(feats, labels)
    assert abs(frechet_joint_distance(generated, reference)) < 1e-9
    assert max(abs(d) for d in per_class_frechet_distances(generated, reference).values()) < 1e-9


def test_a_generator_that_ignores_its_label_has_zero_marginal_fd_but_positive_fjd_and_per_class_fd():
    ref_feats, ref_labels = _class_data(200, seed=0)
    reference = _reference(ref_feats, ref_labels)
    marginal = ReferenceStats.from_features(ref_feats)
    # label-blind: the same features, each with a label drawn independently of it (the same marginal)
    blind_labels = ref_labels[torch.randperm(len(ref_labels), generator=torch.Generator().manual_seed(1))]
    blind = _moments(ref_feats, blind_labels)
    blind_marginal = blind.marginal()
    assert abs(float(marginal.frechet_distance(blind_marginal.mean, blind_marginal.covariance()))) < 1e-9
    # a faithful generator: fresh samples of the same class-conditional distribution
    faithful = _moments(*_class_data(200, seed=2))
    blind_fjd, faithful_fjd = frechet_joint_distance(blind, reference), frechet_joint_distance(faithful, reference)
    assert blind_fjd > 1.0 and blind_fjd > 10 * faithful_fjd
    blind_pc = np.mean(list(per_class_frechet_distances(blind, reference).values()))
    faithful_pc = np.mean(list(per_class_frechet_distances(faithful, reference).values()))
    assert blind_pc > 3.0 and blind_pc > 10 * faithful_pc


def test_labels_outside_the_classes_and_a_class_with_one_generated_sample_are_clear_errors():
    feats, labels = _class_data(10, seed=0)
    moments = ClassConditionalMoments(DIM, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        moments.update(feats[:2], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="at least 2 per class"):
        per_class_frechet_distances(_moments(feats[:11], labels[:11]), _reference(feats, labels))


def test_class_statistics_round_trip_through_a_file(tmp_path):
    from safetensors import safe_open

    feats, labels = _class_data(30, seed=0)
    reference = _reference(feats, labels)
    reference.save(tmp_path / "enc.classes.safetensors")
    loaded = ClassConditionalStats.load(tmp_path / "enc.classes.safetensors")
    assert loaded.alpha == reference.alpha and loaded.num_classes == NUM_CLASSES and loaded.encoder_id == "test-encoder"
    assert loaded.class_counts.tolist() == [30, 30, 30]
    for c in range(NUM_CLASSES):
        assert torch.equal(loaded.class_reference(c).sigma, reference.class_reference(c).sigma)
    generated = _moments(*_class_data(20, seed=3))
    assert frechet_joint_distance(generated, loaded) == frechet_joint_distance(generated, reference)
    with safe_open(str(tmp_path / "enc.classes.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["num_classes"] == "3" and float(meta["alpha"]) == reference.alpha
    assert json.loads(meta["class_counts"]) == [30, 30, 30]
    ReferenceStats.from_features(feats, encoder_id="test-encoder").save(tmp_path / "enc.safetensors")
    with pytest.raises(ValueError, match="not a class statistics file"):
        ClassConditionalStats.load(tmp_path / "enc.safetensors")


# ----------------------------------------------------------------------------------------------- stats from a dataset
ENCODER = "pixels-gray:4"


@pytest.fixture(scope="module")
def labeled_dataset(tmp_path_factory):
    """The digits validation split (360 images, ClassLabel 'label') saved as a local dataset folder."""
    from fd_onestep.demos.digits import digits_dataset

    folder = tmp_path_factory.mktemp("labeled") / "digits"
    digits_dataset("validation").save_to_disk(str(folder))
    return folder


def test_stats_with_a_label_column_give_the_per_class_moments_of_the_rows_and_round_trip(labeled_dataset, tmp_path):
    import datasets

    from fd_onestep.dataset_stats import (
        CLASS_STATS_SUFFIX,
        compute_class_conditional_stats,
        compute_reference_stats,
        resolve_encoders,
        save_reference_stats,
    )
    from fd_onestep.images import pil_to_rgb, pil_to_tensor

    encoders = resolve_encoders([ENCODER])
    (name,) = encoders
    stats, class_stats = compute_class_conditional_stats(encoders, str(labeled_dataset), label_column="label",
                                                         batch_size=50, show_progress=False)
    rows = datasets.load_from_disk(str(labeled_dataset))
    with torch.no_grad():
        feats = encoders[name](torch.stack([pil_to_tensor(pil_to_rgb(im)) for im in rows["image"]])).double().numpy()
    labels = np.asarray(rows["label"])
    ref = class_stats[name]
    assert ref.num_classes == 10 and ref.class_counts.tolist() == np.bincount(labels, minlength=10).tolist()
    for c in (0, 7):
        assert np.allclose(ref.class_reference(c).mu.numpy(), feats[labels == c].mean(0), rtol=0, atol=1e-12)
        assert np.allclose(ref.class_reference(c).sigma.numpy(), np.cov(feats[labels == c], rowvar=False), rtol=0, atol=1e-12)
    # the marginal statistics are those of compute_reference_stats
    plain = compute_reference_stats(encoders, str(labeled_dataset), batch_size=50, show_progress=False)[name]
    assert torch.allclose(stats[name].sigma, plain.sigma, rtol=0, atol=1e-12) and stats[name].num_samples == 360

    paths = save_reference_stats(stats, tmp_path)
    class_paths = save_reference_stats(class_stats, tmp_path, suffix=CLASS_STATS_SUFFIX)
    assert class_paths[name].name.endswith(".classes.safetensors")
    assert torch.equal(ReferenceStats.load(paths[name]).sigma, stats[name].sigma)  # the marginal file: as before
    loaded = ClassConditionalStats.load(class_paths[name])
    assert loaded.alpha == ref.alpha and loaded.metadata["label_column"] == "label"
    assert loaded.encoder_id == encoders[name].encoder_id
    assert torch.equal(loaded.joint_reference.sigma, ref.joint_reference.sigma)


# ----------------------------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def class_pipeline(tmp_path_factory):
    """A tiny class-conditional one-step pipeline (UNet2DModel with 10 class embeddings, 1 x 16 x 16) saved."""
    from train_fixtures import build_teacher

    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

    root = tmp_path_factory.mktemp("class_pipeline")
    build_teacher("unet2d_class").save_pretrained(root / "teacher")
    pipe = FDOneStepPipeline.from_teacher(str(root / "teacher"))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "onestep")
    return pipe, root / "onestep"


def test_evaluate_a_class_conditional_pipeline_reports_adherence_per_class_fd_and_fjd(labeled_dataset, class_pipeline):
    from fd_onestep.dataset_stats import compute_class_conditional_stats, resolve_encoders
    from fd_onestep.demos.digits import classifier_path, classify_digits, load_digit_classifier
    from fd_onestep.evaluation import evaluate_pipeline, generate_batches, image_classifier

    pipe, _ = class_pipeline
    encoders = resolve_encoders([ENCODER])
    (name,) = encoders
    stats, class_stats = compute_class_conditional_stats(encoders, str(labeled_dataset), show_progress=False)
    settings = dict(batch_size=15, seed=4, num_classes=10)
    result = evaluate_pipeline(pipe, encoders, stats, 30, show_progress=False, class_references=class_stats,
                               classifier=image_classifier(classifier_path()), classifier_name="digits", **settings)

    pairs = list(generate_batches(pipe, 30, return_labels=True, **settings))
    images, labels = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    assert labels.tolist() == [i % 10 for i in range(30)]
    with torch.no_grad():
        feats = encoders[name](images).double().numpy()
    ref = class_stats[name]
    per_class = [float(ref.class_reference(c).frechet_distance(torch.from_numpy(feats[labels.numpy() == c].mean(0)),
                                                                torch.from_numpy(np.cov(feats[labels.numpy() == c], rowvar=False))))
                 for c in range(10)]
    cond = result.conditioning
    rep = cond.representations[name]
    assert rep.classes == list(range(10)) and rep.class_fd == pytest.approx(per_class, rel=1e-9)
    assert rep.per_class_fd == pytest.approx(np.mean(per_class), rel=1e-9)
    joint = np.concatenate([feats, ref.alpha * np.eye(10)[labels.numpy()]], axis=1)
    expected_fjd = float(ref.joint_reference.frechet_distance(torch.from_numpy(joint.mean(0)),
                                                              torch.from_numpy(np.cov(joint, rowvar=False))))
    assert rep.fjd == pytest.approx(expected_fjd, rel=1e-9) and rep.alpha == ref.alpha
    predicted, _ = classify_digits(images, load_digit_classifier())
    assert cond.adherence == pytest.approx(float((predicted == labels).double().mean()))
    assert cond.classifier == "digits" and cond.num_classes == 10
    # the marginal FD is the FD of all generated features
    expected_fd = float(stats[name].frechet_distance(torch.from_numpy(feats.mean(0)),
                                                     torch.from_numpy(np.cov(feats, rowvar=False))))
    assert result.representations[name].fd == pytest.approx(expected_fd, rel=1e-9)
    table = result.to_markdown()
    assert "| per-class FD | FJD |" in table and "adherence (classifier `digits`)" in table


def test_cli_stats_with_label_column_then_evaluate_prints_and_saves_the_conditioning(labeled_dataset, class_pipeline,
                                                                                    tmp_path, capsys):
    from fd_onestep.cli import main

    _, pipeline_dir = class_pipeline
    out = tmp_path / "stats"
    assert main(["stats", "--encoders", ENCODER, "--dataset", str(labeled_dataset), "--label_column", "label",
                 "--output_dir", str(out)]) == 0
    (marginal,) = [p for p in out.iterdir() if not p.name.endswith(".classes.safetensors")]
    (classes,) = out.glob("*.classes.safetensors")
    assert "10 classes" in capsys.readouterr().out
    common = ["evaluate", "--pipeline", str(pipeline_dir), "--encoders", ENCODER, "--reference_stats", str(marginal),
              "--num_samples", "20", "--batch_size", "10", "--num_classes", "10"]
    results = tmp_path / "results.json"
    from fd_onestep.demos.digits import classifier_path

    classifier = str(classifier_path())  # the digits demo's classifier: a transformers image-classification folder
    assert main([*common, "--class_stats", str(classes), "--classifier", classifier, "--output", str(results)]) == 0
    printed = capsys.readouterr().out
    assert "| per-class FD | FJD |" in printed and f"adherence (classifier `{classifier}`)" in printed
    data = json.loads(results.read_text())
    cond = data["conditioning"]
    assert 0.0 <= cond["adherence"] <= 1.0 and cond["num_classes"] == 10
    (rep,) = cond["representations"].values()
    assert rep["fjd"] > 0 and rep["per_class_fd"] > 0 and rep["alpha"] == ClassConditionalStats.load(classes).alpha

    # without the class options: the unconditional table and JSON, unchanged
    plain = tmp_path / "plain.json"
    assert main([*common, "--output", str(plain)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| representation | encoder id | FD | validation FD | FDr | N |"
    assert "conditioning" not in json.loads(plain.read_text())
    (plain_rep,) = json.loads(plain.read_text())["representations"].values()
    assert plain_rep["fd"] == pytest.approx(next(iter(data["representations"].values()))["fd"], rel=1e-9)

    # class options need requested labels, and a pipeline
    code = main([*common[:-2], "--class_stats", str(classes)])
    assert code == 2 and "--num_classes" in capsys.readouterr().err


def test_labeled_shards_of_two_processes_sum_to_the_moments_of_one(labeled_dataset):
    """What all_reduce sums under two processes: each rank's shard keeps its images' labels."""
    import datasets

    from fd_onestep.dataset_stats import accumulate_moments, iter_array_batches, iter_dataset_batches, resolve_encoders

    encoders = resolve_encoders([ENCODER])
    (name,) = encoders
    ds = datasets.load_from_disk(str(labeled_dataset))
    images = torch.rand(11, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2, 1, 0])
    for shards_of in (lambda rank, world: iter_array_batches(images, batch_size=3, rank=rank, world_size=world,
                                                             labels=labels)[0],
                      lambda rank, world: iter_dataset_batches(ds, "image", batch_size=40, rank=rank, world_size=world,
                                                               label_column="label")[0]):
        num_classes = 10
        whole = accumulate_moments(shards_of(0, 1), encoders, num_classes=num_classes, show_progress=False)[name]
        summed = accumulate_moments(shards_of(0, 2), encoders, num_classes=num_classes, show_progress=False)[name]
        summed.merge(accumulate_moments(shards_of(1, 2), encoders, num_classes=num_classes, show_progress=False)[name])
        assert summed.class_counts.tolist() == whole.class_counts.tolist()
        for mine, theirs in zip(summed.classes, whole.classes):
            assert torch.allclose(mine.sum_outer, theirs.sum_outer, rtol=0, atol=1e-10)


def test_class_statistics_files_store_the_symmetric_second_moments_packed_and_load_them_back_exactly(tmp_path):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(60, 5, generator=g, dtype=torch.float64), torch.arange(60) % 3
    stats = ClassConditionalStats.from_moments(ClassConditionalMoments(5, 3).update(features, labels), encoder_id="e")
    stats.save(tmp_path / "e.classes.safetensors")
    with safe_open(str(tmp_path / "e.classes.safetensors"), "pt") as f:
        assert f.get_tensor("class_sum_outer_triu").shape == (3, 15)  # d (d + 1) / 2 per class
        assert "class_sum_outer" not in f.keys()
    back = ClassConditionalStats.load(tmp_path / "e.classes.safetensors")
    for key, value in stats.moments.state_dict().items():
        assert torch.equal(back.moments.state_dict()[key], value), key


def test_cli_evaluate_measures_adherence_with_any_hugging_face_image_classifier(class_pipeline, tmp_path, capsys):
    """--classifier takes any transformers image classifier folder, not only the digits demo's: a tiny random ViT
    built from a config, RGB at its own resolution, classifies the 1-channel 16x16 samples through its processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from fd_onestep.classifiers import classify_images, load_image_classifier
    from fd_onestep.cli import main
    from fd_onestep.dataset_stats import compute_reference_stats, resolve_encoders, save_reference_stats
    from fd_onestep.evaluation import generate_batches

    torch.manual_seed(0)
    folder = tmp_path / "tiny-vit-classifier"
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=10)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)

    pipe, pipeline_dir = class_pipeline
    encoders = resolve_encoders([ENCODER])
    images = torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    stats = save_reference_stats(compute_reference_stats(encoders, images=images, show_progress=False), tmp_path / "stats")
    results = tmp_path / "results.json"
    assert main(["evaluate", "--pipeline", str(pipeline_dir), "--encoders", ENCODER, "--reference_stats",
                 *map(str, stats.values()), "--num_samples", "20", "--batch_size", "10", "--num_classes", "10",
                 "--classifier", str(folder), "--output", str(results)]) == 0
    assert f"adherence (classifier `{folder}`)" in capsys.readouterr().out
    cond = json.loads(results.read_text())["conditioning"]

    pairs = list(generate_batches(pipe, 20, return_labels=True, batch_size=10, seed=0, num_classes=10))
    generated, labels = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    predicted, _ = classify_images(generated, load_image_classifier(folder))
    assert cond["adherence"] == pytest.approx(float((predicted == labels).double().mean()))
