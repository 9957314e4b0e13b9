"""Specification of fd_onestep.reference_stats.ReferenceStats: files, metadata, cached root, checks."""

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

import fd_onestep
from fd_onestep.frechet import frechet_distance
from fd_onestep.moments import FeatureMoments
from fd_onestep.reference_stats import ReferenceStats


def _features(n=400, d=16, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) / 4 + shift


def test_from_features_matches_numpy_statistics_and_records_metadata():
    x = _features()
    ref = ReferenceStats.from_features(x, encoder_id="enc-a", dataset="toy", validation_fd=0.5)
    np.testing.assert_allclose(ref.mu.numpy(), x.numpy().mean(0), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ref.sigma.numpy(), np.cov(x.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    assert ref.num_samples == 400 and ref.feature_dim == 16 and ref.encoder_id == "enc-a"
    assert ref.metadata["dataset"] == "toy" and ref.metadata["feature_dim"] == "16"
    assert ref.metadata["library_version"] == fd_onestep.__version__
    assert ref.validation_fd == 0.5 and ref.relative_fd(2.0) == 4.0


def test_from_moments_equals_from_features():
    x = _features()
    m = FeatureMoments(16)
    for chunk in x.split(50):
        m.update(chunk)
    a, b = ReferenceStats.from_moments(m), ReferenceStats.from_features(x)
    assert torch.allclose(a.sigma, b.sigma, rtol=1e-12) and a.num_samples == b.num_samples


def test_safetensors_round_trip_keeps_tensors_and_metadata(tmp_path):
    ref = ReferenceStats.from_features(_features(), encoder_id="enc-a", resolution="64", validation_fd=1.25)
    path = tmp_path / "stats" / "enc-a.safetensors"
    ref.save(path)
    loaded = ReferenceStats.load(path)
    assert torch.equal(loaded.mu, ref.mu) and torch.equal(loaded.sigma, ref.sigma)
    assert loaded.num_samples == 400 and loaded.validation_fd == 1.25
    assert loaded.encoder_id == "enc-a" and loaded.metadata["resolution"] == "64"
    assert loaded.metadata["library_version"] == fd_onestep.__version__
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["num_samples"] == "400" and meta["feature_dim"] == "16" and meta["encoder_id"] == "enc-a"
    assert [p.name for p in path.parent.iterdir()] == ["enc-a.safetensors"]  # no temp file left


def test_saved_file_gets_the_umask_mode_not_the_private_temp_file_mode(tmp_path):
    # the atomic write goes through mkstemp (0600); the result must be as readable as a plain open()
    import os

    ReferenceStats.from_features(_features()).save(tmp_path / "ref.safetensors")
    (tmp_path / "plain").write_bytes(b"")
    assert os.stat(tmp_path / "ref.safetensors").st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777
    assert not list(tmp_path.glob(".*.tmp"))


def test_npz_is_pytorch_fid_compatible_both_ways(tmp_path):
    ref = ReferenceStats.from_features(_features(), encoder_id="enc-a")
    path = tmp_path / "stats.npz"
    ref.to_npz(path)
    from pytorch_fid.fid_score import compute_statistics_of_path

    mu, sigma = compute_statistics_of_path(str(path), None, 1, 1, "cpu")  # pytorch-fid's own reader of an .npz
    np.testing.assert_array_equal(mu, ref.mu.numpy())
    np.testing.assert_array_equal(sigma, ref.sigma.numpy())
    with np.load(path, allow_pickle=False) as f:  # beside mu and sigma: what a round trip through .npz keeps
        assert sorted(f.files) == ["metadata", "mu", "num_samples", "sigma", "validation_fd"]
    other = _features(seed=1, shift=0.2)
    np.savez(tmp_path / "other.npz", mu=other.numpy().mean(0), sigma=np.cov(other.numpy(), rowvar=False))
    loaded = ReferenceStats.from_npz(tmp_path / "other.npz", encoder_id="enc-a")
    assert loaded.encoder_id == "enc-a"
    expected = calculate_frechet_distance(ref.mu.numpy(), ref.sigma.numpy(), loaded.mu.numpy(), loaded.sigma.numpy())
    assert abs(float(ref.frechet_distance(loaded.mu, loaded.sigma)) - expected) <= 1e-10 * expected


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(ValueError, match="allow_pickle"):
        ReferenceStats.from_npz(path)


def test_missing_files_and_wrong_keys_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="fd-onestep stats"):
        ReferenceStats.load(tmp_path / "nope.safetensors")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="need 'mu' and 'sigma'"):
        ReferenceStats.from_npz(tmp_path / "bad.npz")
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a reference statistics file"):
        ReferenceStats.load(tmp_path / "model.safetensors")


def test_factor_and_sqrt_sigma_are_cached_and_distance_matches_plain_function():
    x, y = _features(), _features(seed=2, shift=0.1)
    ref = ReferenceStats.from_features(x)
    assert ref.sqrt_sigma is ref.sqrt_sigma
    assert ref.factor is ref.factor
    mu_q, s_q = y.mean(0), torch.cov(y.T)
    expected = frechet_distance(ref.mu, ref.sigma, mu_q, s_q)
    assert abs(float(ref.frechet_distance(mu_q, s_q)) - float(expected)) <= 1e-12 * float(expected)


def test_distance_takes_numpy_or_torch_and_names_the_encoder_on_a_dimension_mismatch():
    ref = ReferenceStats.from_features(_features(), encoder_id="dinov2")
    y = _features(seed=2, shift=0.1)
    mu_q, s_q = y.mean(0), torch.cov(y.T)
    from_torch = ref.frechet_distance(mu_q, s_q)
    from_numpy = ref.frechet_distance(mu_q.numpy(), s_q.numpy())
    assert from_numpy.device.type == "cpu" and torch.equal(from_numpy, from_torch)
    assert torch.equal(fd_onestep.frechet_distance_to_reference(ref, mu_q, s_q), from_torch)
    with pytest.raises(ValueError, match=r"feature dimensions differ: reference \(encoder 'dinov2'\) has d=16, "
                                         r"generated has d=8; compute the generated features with the encoder"):
        ref.frechet_distance(mu_q[:8], s_q[:8, :8])
    with pytest.raises(ValueError, match="generated: mu contains NaN"):  # validation first, then the dimension
        ref.frechet_distance(torch.full((8,), float("nan"), dtype=torch.float64), s_q[:8, :8])


def test_check_compatible_names_both_encoders_and_dims():
    ref = ReferenceStats.from_features(_features(), encoder_id="inception")
    ref.check_compatible("inception", 16)
    with pytest.raises(ValueError, match="computed with encoder 'inception'.*'dinov2'.*recompute"):
        ref.check_compatible("dinov2", 16)
    with pytest.raises(ValueError, match="feature_dim=16.*feature_dim=768"):
        ref.check_compatible("inception", 768)
    ReferenceStats(mu=ref.mu, sigma=ref.sigma).check_compatible("anything", 16)  # id unknown: dim only


def test_invalid_statistics_are_refused_at_construction():
    with pytest.raises(ValueError, match="not symmetric"):
        ReferenceStats(mu=torch.zeros(2), sigma=torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        ReferenceStats(mu=torch.tensor([0.0, float("nan")]), sigma=torch.eye(2))
