"""Specification of FD / FDr / FD_r^k evaluation of images, folders, callables and pipelines."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fd_onestep.dataset_stats import compute_reference_stats
from fd_onestep.encoders import load_encoder
from fd_onestep.encoders.testing import save_tiny_siglip
from fd_onestep.evaluation import EvaluationResult, evaluate_folder, evaluate_images, evaluate_pipeline
from fd_onestep.images import center_crop_resize, pil_to_tensor, tensor_to_pil


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return save_tiny_siglip(tmp_path_factory.mktemp("models") / "tiny-siglip")


@pytest.fixture(scope="module")
def encoders(siglip_dir):
    return {"siglip": load_encoder(str(siglip_dir)), "siglip_mean": load_encoder(f"{siglip_dir}@mean")}


@pytest.fixture(scope="module")
def real_images():
    torch.manual_seed(0)
    return torch.rand(40, 3, 32, 32) * 2 - 1


@pytest.fixture(scope="module")
def references(encoders, real_images):
    refs = compute_reference_stats(encoders, images=real_images[:24], batch_size=8, show_progress=False)
    held_out = evaluate_images(real_images[24:], encoders, refs)
    for name, ref in refs.items():
        ref.validation_fd = held_out.representations[name].fd
    return refs


def _features(encoder, images):
    with torch.no_grad():
        return encoder(images).double()


def test_fd_per_representation_is_the_frechet_distance_of_the_generated_features(encoders, references):
    generated = torch.rand(20, 3, 32, 32) * 1.6 - 0.9
    result = evaluate_images(generated, encoders, references, batch_size=7)
    for name, encoder in encoders.items():
        feats = _features(encoder, generated)
        expected = float(references[name].frechet_distance(feats.mean(0), torch.cov(feats.T)))
        r = result.representations[name]
        assert r.fd == pytest.approx(expected, rel=1e-6) and r.num_samples == 20
        assert r.encoder_id == encoder.encoder_id and r.reference_num_samples == 24


def test_fd_r_divides_by_the_validation_fd_and_fd_r_k_is_their_mean(encoders, references):
    result = evaluate_images(torch.rand(16, 3, 32, 32) * 2 - 1, encoders, references)
    ratios = []
    for name, r in result.representations.items():
        assert r.validation_fd == references[name].validation_fd > 0
        assert r.fd_r == pytest.approx(r.fd / r.validation_fd)
        ratios.append(r.fd_r)
    assert result.k == 2 and result.fd_r_k == pytest.approx(sum(ratios) / 2)


def test_without_validation_fd_there_is_no_fd_r(encoders, real_images):
    refs = compute_reference_stats(encoders, images=real_images[:24], show_progress=False)
    result = evaluate_images(real_images[24:], encoders, refs)
    assert all(r.fd_r is None for r in result.representations.values())
    assert result.fd_r_k is None and result.k == 0 and "| - |" in result.to_markdown()


def test_batches_from_an_iterable_give_the_same_result_as_one_tensor(encoders, references, real_images):
    whole = evaluate_images(real_images, encoders, references)
    pieces = evaluate_images((real_images[i : i + 10] for i in range(0, 40, 10)), encoders, references)
    for name in encoders:
        assert pieces.representations[name].fd == pytest.approx(whole.representations[name].fd, rel=1e-6)


def test_markdown_table_and_json_round_trip(encoders, references, tmp_path):
    result = evaluate_images(torch.rand(8, 3, 32, 32) * 2 - 1, encoders, references, metadata={"source": "test"})
    table = result.to_markdown()
    assert table.splitlines()[0].startswith("| representation | encoder id | FD | validation FD | FDr | N |")
    assert "| siglip |" in table and "FD_r^2" in table
    path = result.save_json(tmp_path / "results.json")
    data = json.loads(path.read_text())
    assert data["fd_r_k"] == result.fd_r_k and data["representations"]["siglip"]["fd"] == result.representations["siglip"].fd
    assert EvaluationResult.from_dict(data) == result


def test_mismatched_reference_stats_are_rejected_before_encoding(encoders, references):
    swapped = {"siglip": references["siglip_mean"], "siglip_mean": references["siglip"]}
    with pytest.raises(ValueError, match="siglip:tiny-siglip:mean:32"):
        evaluate_images(torch.rand(4, 3, 32, 32) * 2 - 1, encoders, swapped)


def test_missing_reference_for_an_encoder_is_a_clear_error(encoders, references):
    with pytest.raises(ValueError, match="No reference statistics for encoder"):
        evaluate_images(torch.rand(4, 3, 32, 32) * 2 - 1, encoders, {"siglip": references["siglip"]})


def test_nan_generated_images_are_a_clear_error(encoders, references):
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    images[1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        evaluate_images(images, encoders, references)


def test_callable_generator_n_to_images(encoders, references):
    calls = []

    def generate(n):
        calls.append(n)
        return torch.rand(n, 3, 32, 32) * 2 - 1

    result = evaluate_pipeline(generate, encoders, references, num_samples=10, batch_size=4, show_progress=False)
    assert calls == [4, 4, 2] and result.num_samples == 10


def test_image_folder_evaluation_equals_in_memory_evaluation(encoders, references, tmp_path):
    images = torch.rand(9, 3, 32, 32) * 2 - 1
    for i, pil in enumerate(tensor_to_pil(images)):
        pil.save(tmp_path / f"{i}.png")
    quantized = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / f"{i}.png"))).permute(2, 0, 1) for i in range(9)])
    from_folder = evaluate_folder(tmp_path, encoders, references, batch_size=4, show_progress=False)
    in_memory = evaluate_images(quantized.float() / 127.5 - 1, encoders, references)
    for name in encoders:
        assert from_folder.representations[name].fd == pytest.approx(in_memory.representations[name].fd, rel=1e-6)


def test_diffusers_pipeline_is_sampled_reproducibly_by_seed(encoders, references):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_samples=6, batch_size=4, seed=3, pipeline_kwargs={"num_inference_steps": 2}, show_progress=False)
    first = evaluate_pipeline(pipe, encoders, references, **kwargs)
    second = evaluate_pipeline(pipe, encoders, references, **kwargs)
    assert first.num_samples == 6
    assert first.fd() == second.fd()
    other_seed = evaluate_pipeline(pipe, encoders, references, **{**kwargs, "seed": 4})
    assert other_seed.fd() != first.fd()


def _save_random(path, width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_image_folder_of_mixed_sizes_is_rejected_from_the_headers_before_encoding(encoders, references, tmp_path,
                                                                                   monkeypatch):
    import fd_onestep.dataset_stats

    for i, (w, h) in enumerate([(32, 32), (32, 32), (40, 36), (32, 32)]):
        _save_random(tmp_path / f"{i}.png", w, h, seed=i)
    real_accumulate = fd_onestep.dataset_stats.accumulate_moments

    def must_not_run(*args, **kwargs):
        raise AssertionError("images were encoded before the sizes were checked")

    monkeypatch.setattr(fd_onestep.dataset_stats, "accumulate_moments", must_not_run)
    with pytest.raises(ValueError, match=r"'.*0\.png' is 32x32 but '.*2\.png' is 40x36 .*resolution"):
        evaluate_folder(tmp_path, encoders, references, show_progress=False)
    # max_samples limits the check to the images that would be read
    monkeypatch.setattr(fd_onestep.dataset_stats, "accumulate_moments", real_accumulate)
    assert evaluate_folder(tmp_path, encoders, references, max_samples=2, show_progress=False).num_samples == 2

    # with a resolution every image is center-crop-resized first, as the reference statistics are
    resized = evaluate_folder(tmp_path, encoders, references, resolution=24, batch_size=3, show_progress=False)
    expected = evaluate_images(torch.stack([pil_to_tensor(center_crop_resize(Image.open(tmp_path / f"{i}.png"), 24))
                                            for i in range(4)]), encoders, references)
    assert resized.num_samples == 4 and resized.metadata["resolution"] == "24"
    for name in encoders:
        assert resized.representations[name].fd == pytest.approx(expected.representations[name].fd, rel=1e-6)


def test_an_unreadable_file_in_an_image_folder_is_named_before_encoding(encoders, references, tmp_path):
    _save_random(tmp_path / "0.png", 32, 32, seed=0)
    (tmp_path / "1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"Cannot read '.*1\.png' as an image"):
        evaluate_folder(tmp_path, encoders, references, show_progress=False)
