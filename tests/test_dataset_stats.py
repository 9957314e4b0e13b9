"""Specification of reference statistics from datasets, image folders and .npz files."""

import numpy as np
import pytest
import torch
from PIL import Image

from fd_onestep.dataset_stats import (
    compute_reference_stats,
    export_npz_stats,
    import_npz_stats,
    iter_array_batches,
    iter_folder_batches,
    save_reference_stats,
)
from fd_onestep.encoders import load_encoder
from fd_onestep.encoders.testing import save_tiny_siglip
from fd_onestep.images import pil_to_tensor
from fd_onestep.reference_stats import ReferenceStats


def _write_images(folder, n, size=32, seed=0, odd_modes=True):
    """n PNGs; with odd_modes, one grayscale, one RGBA and one palette image among them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if odd_modes and i == 1:
            image = image.convert("L")
        elif odd_modes and i == 2:
            image = image.convert("RGBA")
        elif odd_modes and i == 3:
            image = image.convert("P")
        image.save(folder / f"img_{i:03d}.png")
    return folder


def _direct_moments(encoder, folder):
    """Features of every file, one image at a time, and numpy's mean / unbiased covariance."""
    files = sorted(folder.glob("*.png"))
    with torch.no_grad():
        feats = torch.cat([encoder(pil_to_tensor(Image.open(f))[None]) for f in files]).double().numpy()
    return feats.mean(0), np.cov(feats, rowvar=False), len(files)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return save_tiny_siglip(tmp_path_factory.mktemp("models") / "tiny-siglip")


@pytest.fixture(scope="module")
def encoder(siglip_dir):
    return load_encoder(str(siglip_dir))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("data") / "images", 12)


def test_imagefolder_dataset_stats_equal_mean_and_covariance_of_the_features(encoder, image_dir):
    stats = compute_reference_stats({"siglip": encoder}, str(image_dir), batch_size=5, show_progress=False)["siglip"]
    mu, sigma, n = _direct_moments(encoder, image_dir)
    assert stats.num_samples == n == 12  # grayscale, RGBA and palette images are converted, not rejected
    assert _rel(stats.mu, mu) < 1e-6 and _rel(stats.sigma, sigma) < 1e-6  # float32 batching differs from one-by-one
    assert stats.mu.dtype == torch.float64 and stats.sigma.dtype == torch.float64


def test_plain_folder_and_imagefolder_dataset_give_the_same_stats(encoder, image_dir):
    a = compute_reference_stats({"siglip": encoder}, str(image_dir), batch_size=4, show_progress=False)["siglip"]
    b = compute_reference_stats({"siglip": encoder}, images_dir=image_dir, batch_size=4, show_progress=False)["siglip"]
    assert _rel(a.mu, b.mu) < 1e-10 and _rel(a.sigma, b.sigma) < 1e-10


def test_streaming_dataset_gives_the_same_stats(encoder, image_dir):
    a = compute_reference_stats({"siglip": encoder}, str(image_dir), batch_size=4, show_progress=False)["siglip"]
    b = compute_reference_stats({"siglip": encoder}, str(image_dir), batch_size=4, streaming=True, show_progress=False)["siglip"]
    assert b.num_samples == 12
    assert _rel(a.mu, b.mu) < 1e-10 and _rel(a.sigma, b.sigma) < 1e-10


def test_metadata_records_encoder_resolution_count_preprocessing_dataset_and_version(encoder, image_dir):
    stats = compute_reference_stats({"siglip": encoder}, str(image_dir), split="train", max_samples=6,
                                    resolution=24, show_progress=False)["siglip"]
    md = stats.metadata
    assert stats.num_samples == 6 and md["num_images"] == "6"
    assert md["encoder_id"] == encoder.encoder_id == stats.encoder_id
    assert md["feature_dim"] == "32" and md["resolution"] == "24" and md["encoder_input_size"] == "32"
    assert "center-crop-resize to 24" in md["preprocessing"] and "bicubic resize to 32" in md["preprocessing"]
    assert md["dataset"] == str(image_dir) and md["split"] == "train"
    assert "fd_onestep" in md["library_version"] and "torch" in md["library_version"]


def test_one_pass_serves_several_encoders(siglip_dir, image_dir):
    stats = compute_reference_stats([str(siglip_dir), f"{siglip_dir}@mean"], images_dir=image_dir, show_progress=False)
    assert set(stats) == {"tiny-siglip", "tiny-siglip_mean"}
    assert stats["tiny-siglip"].encoder_id.endswith(":pooler:32") and stats["tiny-siglip_mean"].encoder_id.endswith(":mean:32")


def test_validation_split_fd_is_stored_for_fd_r(encoder, tmp_path):
    _write_images(tmp_path / "ds" / "train", 8, seed=1, odd_modes=False)
    _write_images(tmp_path / "ds" / "validation", 6, seed=2, odd_modes=False)
    stats = compute_reference_stats({"siglip": encoder}, str(tmp_path / "ds"), split="train",
                                    validation_split="validation", show_progress=False)["siglip"]
    val_mu, val_sigma, _ = _direct_moments(encoder, tmp_path / "ds" / "validation")
    expected = float(stats.frechet_distance(torch.from_numpy(val_mu), torch.from_numpy(val_sigma)))
    assert stats.num_samples == 8 and stats.validation_fd == pytest.approx(expected, rel=1e-5)
    assert stats.validation_fd > 0 and stats.metadata["validation_num_images"] == "6"


def test_unknown_split_and_column_are_clear_errors(encoder, image_dir):
    with pytest.raises(ValueError, match="split"):
        compute_reference_stats({"siglip": encoder}, str(image_dir), split="nope", show_progress=False)
    with pytest.raises(ValueError, match="image_column"):
        compute_reference_stats({"siglip": encoder}, str(image_dir), image_column="pixels", show_progress=False)


def test_empty_image_folder_is_a_clear_error(encoder, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images found"):
        compute_reference_stats({"siglip": encoder}, images_dir=tmp_path / "empty", show_progress=False)


@pytest.mark.parametrize("content", ["nothing", "text_only"])
def test_empty_dataset_is_a_clear_error(encoder, tmp_path, content):
    folder = tmp_path / "ds"
    folder.mkdir()
    if content == "text_only":
        (folder / "notes.txt").write_text("a text file, no images\n")
    with pytest.raises(ValueError, match="contains no image"):
        compute_reference_stats({"siglip": encoder}, str(folder), show_progress=False)


def test_offline_dataset_hub_id_is_a_clear_error(encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download --repo-type dataset"):
        compute_reference_stats({"siglip": encoder}, "someone/not-cached-dataset", cache_dir=tmp_path, show_progress=False)


def test_saved_stats_round_trip_and_export_to_pytorch_fid_npz(encoder, image_dir, tmp_path):
    stats = compute_reference_stats({"siglip": encoder}, images_dir=image_dir, show_progress=False)
    path = save_reference_stats(stats, tmp_path / "stats")["siglip"]
    assert path.name == "siglip.safetensors"
    loaded = ReferenceStats.load(path)
    assert torch.equal(loaded.mu, stats["siglip"].mu) and loaded.encoder_id == encoder.encoder_id
    npz = export_npz_stats(path, tmp_path / "siglip.npz")
    with np.load(npz, allow_pickle=False) as data:
        assert np.array_equal(data["mu"], stats["siglip"].mu.numpy()) and data["sigma"].shape == (32, 32)
    imported = import_npz_stats(npz, encoder_id=encoder.encoder_id)
    (ref,) = imported.values()
    assert torch.equal(ref.sigma, stats["siglip"].sigma) and ref.encoder_id == encoder.encoder_id


def test_adm_reference_batch_images_are_encoded_like_the_same_images_on_disk(encoder, tmp_path):
    folder = _write_images(tmp_path / "adm", 10, odd_modes=False)
    arr = np.stack([np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png"))])
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=arr, mu=np.zeros(2048), sigma=np.eye(2048))
    from_npz = import_npz_stats(tmp_path / "VIRTUAL_ref.npz", encoders={"siglip": encoder}, batch_size=4, show_progress=False)["siglip"]
    from_dir = compute_reference_stats({"siglip": encoder}, images_dir=folder, batch_size=4, show_progress=False)["siglip"]
    assert from_npz.num_samples == 10
    assert _rel(from_npz.mu, from_dir.mu) < 1e-10 and _rel(from_npz.sigma, from_dir.sigma) < 1e-10


def test_adm_precomputed_mu_sigma_import_and_pickled_npz_is_refused(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=np.ones(2048), sigma=np.eye(2048))
    (ref,) = import_npz_stats(tmp_path / "ref.npz").values()
    assert ref.encoder_id == "inception-v3-fid/pool3" and ref.feature_dim == 2048
    np.savez(tmp_path / "pickled.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(2))
    with pytest.raises(ValueError, match="allow_pickle"):
        import_npz_stats(tmp_path / "pickled.npz")


def _image_ids(batches):
    """The id i of each image with constant pixel value i (uint8), in the order the batches give them."""
    return [round(float(image[0, 0, 0] + 1) * 127.5) for batch in batches for image in batch]


def test_process_shards_are_contiguous_larger_first_and_cover_every_image_once(tmp_path):
    # 11 images over 3 processes: shards of 4, 4, 3 in order (accelerate's split_between_processes layout)
    ids = np.arange(11, dtype=np.uint8)
    images = np.broadcast_to(ids[:, None, None, None], (11, 4, 4, 3)).copy()
    for source in (images, _as_float_images(images)):
        shards = [iter_array_batches(source, batch_size=3, rank=r, world_size=3) for r in range(3)]
        assert [n for _, n in shards] == [4, 4, 3]
        assert [_image_ids(batches) for batches, _ in shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    folder = tmp_path / "ids"
    folder.mkdir()
    for i in ids:
        Image.fromarray(images[i]).save(folder / f"{i:02d}.png")
    shards = [iter_folder_batches(folder, batch_size=3, rank=r, world_size=3) for r in range(3)]
    assert [n for _, n in shards] == [4, 4, 3]
    assert [_image_ids(batches) for batches, _ in shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    # more processes than images: the last processes get empty shards
    shards = [iter_array_batches(images[:2], batch_size=3, rank=r, world_size=3) for r in range(3)]
    assert [n for _, n in shards] == [1, 1, 0]
    assert [_image_ids(batches) for batches, _ in shards] == [[0], [1], []]


def _as_float_images(images):
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1], the other in-memory layout."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------- unreadable images


def _truncate(path):
    """Cut a PNG file to half its bytes: PIL identifies it but cannot decode it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture()
def folder_with_a_truncated_png(tmp_path):
    folder = _write_images(tmp_path / "images", 8, size=16, seed=3, odd_modes=False)
    good = _write_images(tmp_path / "good", 8, size=16, seed=3, odd_modes=False)
    (good / "img_005.png").unlink()
    return _truncate(folder / "img_005.png"), good


def test_a_truncated_image_in_a_folder_is_named_in_the_error(folder_with_a_truncated_png):
    bad, _ = folder_with_a_truncated_png
    pixels = {"pixels": load_encoder("pixels:4")}
    fix = r"skip_unreadable=True.*--skip_unreadable_images"
    with pytest.raises(ValueError, match=r"Cannot read the image '.*img_005\.png'.*" + fix):
        compute_reference_stats(pixels, images_dir=bad.parent, batch_size=3, show_progress=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_images_in_a_folder_can_be_skipped_and_are_counted(folder_with_a_truncated_png, num_workers):
    bad, good = folder_with_a_truncated_png
    pixels = {"pixels": load_encoder("pixels:4")}
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*img_005\.png"):
        skipped = compute_reference_stats(pixels, images_dir=bad.parent, batch_size=3, skip_unreadable=True,
                                          num_workers=num_workers, show_progress=False)["pixels"]
    clean = compute_reference_stats(pixels, images_dir=good, batch_size=3, show_progress=False)["pixels"]
    assert skipped.num_samples == 7 and skipped.metadata["skipped_unreadable_images"] == "1"
    # the same 7 images (other batch boundaries: sums in another order)
    assert _rel(skipped.mu, clean.mu) < 1e-12 and _rel(skipped.sigma, clean.sigma) < 1e-12
    assert "skipped_unreadable_images" not in clean.metadata  # only recorded when skipping was asked for


def test_unreadable_images_in_a_dataset_are_named_by_row_and_file_or_skipped(tmp_path):
    train = _write_images(tmp_path / "ds" / "train", 6, size=16, seed=4, odd_modes=False)
    _truncate(train / "img_002.png")
    pixels = {"pixels": load_encoder("pixels:4")}
    with pytest.raises(ValueError, match=r"Cannot read the image '.*img_002\.png' \(dataset row 2\)"):
        compute_reference_stats(pixels, str(tmp_path / "ds"), batch_size=4, show_progress=False)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        stats = compute_reference_stats(pixels, str(tmp_path / "ds"), batch_size=4, skip_unreadable=True,
                                        show_progress=False)["pixels"]
    assert stats.num_samples == 5 and stats.metadata["skipped_unreadable_images"] == "1"
