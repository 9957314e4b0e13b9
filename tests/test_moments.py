"""Specification of fd_onestep.moments.FeatureMoments: streamed float64 raw moments."""

import numpy as np
import pytest
import torch

from fd_onestep.moments import FeatureMoments, covariance_from_moments, raw_sums


def test_streamed_chunks_give_numpy_cov_and_mean():
    x = torch.randn(500, 12, dtype=torch.float32) * 3 + 1
    moments = FeatureMoments(12)
    for chunk in x.split(64):
        moments.update(chunk)
    assert moments.count == 500
    assert moments.sum.dtype == torch.float64 and moments.sum_outer.shape == (12, 12)
    x64 = x.double().numpy()
    np.testing.assert_allclose(moments.mean.numpy(), x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moments.covariance().numpy(), np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(moments.covariance(unbiased=False).numpy(), np.cov(x64, rowvar=False, bias=True),
                               rtol=1e-10, atol=1e-12)
    cov = moments.covariance()
    assert torch.equal(cov, cov.T)


def test_merge_equals_one_accumulator():
    x = torch.randn(300, 7, dtype=torch.float64)
    a, b = FeatureMoments(7).update(x[:100]), FeatureMoments(7).update(x[100:])
    whole = FeatureMoments(7).update(x)
    a.merge(b)
    assert a.count == whole.count
    assert torch.allclose(a.sum_outer, whole.sum_outer, rtol=1e-13)
    with pytest.raises(ValueError, match="same encoder"):
        a.merge(FeatureMoments(8))


def test_all_reduce_without_distributed_is_a_no_op():
    m = FeatureMoments(4).update(torch.randn(10, 4))
    before = m.state_dict()
    m.all_reduce()
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_dict_round_trip_is_tensors_only(tmp_path):
    m = FeatureMoments(5).update(torch.randn(20, 5))
    state = m.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.save(state, tmp_path / "m.pt")
    restored = FeatureMoments(5)
    restored.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert restored.count == 20 and torch.equal(restored.sum_outer, m.sum_outer)
    with pytest.raises(ValueError, match="same feature dimension"):
        FeatureMoments(6).load_state_dict(state)


def test_nan_or_inf_features_raise_with_a_hint():
    m = FeatureMoments(3)
    bad = torch.randn(4, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf.*generator output"):
        m.update(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        m.update(bad)
    assert m.count == 0  # nothing half-added


def test_wrong_feature_dim_or_shape_raises_naming_the_fix():
    m = FeatureMoments(3)
    with pytest.raises(ValueError, match="dimension 4 but 3 was expected.*feature_dim"):
        m.update(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"shape \(B, d\).*flatten"):
        m.update(torch.randn(2, 3, 1))


def test_covariance_needs_two_samples():
    m = FeatureMoments(3).update(torch.randn(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        m.covariance()


def test_covariance_from_moments_is_numpy_cov_for_equal_and_for_reliability_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64) * 2 + 1
    s1, s2 = raw_sums(x)
    assert torch.equal(s1, x.sum(0)) and torch.equal(s2, x.T @ x)
    # n equal samples: W = n, denominator n - 1 (numpy.cov), what FeatureMoments uses
    n = x.shape[0]
    cov = covariance_from_moments(s1 / n, s2, n, n - 1)
    assert torch.equal(cov, FeatureMoments.from_features(x).covariance()) and torch.equal(cov, cov.T)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.numpy(), rowvar=False), rtol=1e-12, atol=1e-13)
    # normalized weights (an EMA's): W = 1, denominator 1 - V2 = numpy.cov with aweights
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    w = w / w.sum()
    mu, second = w @ x, x.T @ (w[:, None] * x)
    cov = covariance_from_moments(mu, second, 1.0, 1.0 - float((w * w).sum()))
    assert torch.equal(cov, cov.T)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.numpy(), rowvar=False, aweights=w.numpy()), rtol=1e-11, atol=1e-12)
    # equal normalized weights 1/n: the same estimator as numpy.cov
    cov = covariance_from_moments(s1 / n, s2 / n, 1.0, 1.0 - 1.0 / n)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.numpy(), rowvar=False), rtol=1e-12, atol=1e-13)


def test_accumulated_second_moment_is_exactly_symmetric():
    """sum z z^T stays bitwise symmetric whatever the BLAS's round-off in z^T z (statistics files store only its
    upper triangle and must load back the same numbers)."""
    g = torch.Generator().manual_seed(0)
    for batch, dim in ((60, 5), (64, 256), (1000, 64)):  # shapes whose float64 z^T z was not symmetric here
        moments = FeatureMoments(dim)
        for _ in range(2):
            moments.update(torch.randn(batch, dim, generator=g, dtype=torch.float64))
        assert torch.equal(moments.sum_outer, moments.sum_outer.mT), (batch, dim)
