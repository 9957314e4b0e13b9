"""Specification of fd_onestep.frechet: exact value, closed-form gradient, clear errors."""

import mpmath
import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

import fd_onestep.reference_stats as reference_stats_module
from fd_onestep.frechet import (
    eigenvalue_floor,
    frechet_distance,
    frechet_distance_from_factor,
    frechet_distance_to_reference,
    reference_factor,
    sqrtm_psd,
    validate_stats,
)
from fd_onestep.reference_stats import ReferenceStats

F64_EPS = np.finfo(np.float64).eps


def _stats(n, d, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    x = x * scale / d**0.5 + shift
    return x.mean(0), torch.cov(x.T)


def _random_orthogonal(d, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


# ----------------------------------------------------------------------------- value


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_matches_pytorch_fid_scipy_route_to_1e_10(seed):
    mu_p, s_p = _stats(400, 48, seed)
    mu_q, s_q = _stats(300, 48, seed + 100, scale=1.5, shift=0.3)
    ours = frechet_distance(mu_p, s_p, mu_q, s_q)
    scipy_route = calculate_frechet_distance(mu_p.numpy(), s_p.numpy(), mu_q.numpy(), s_q.numpy())
    assert abs(float(ours) - scipy_route) <= 1e-10 * abs(scipy_route)


def test_returns_0dim_float64_tensor_for_numpy_and_torch_inputs():
    mu_p, s_p = _stats(200, 12, 0)
    mu_q, s_q = _stats(200, 12, 1)
    from_torch = frechet_distance(mu_p.float(), s_p.float(), mu_q.float(), s_q.float())
    from_numpy = frechet_distance(mu_p.numpy(), s_p.numpy(), mu_q.numpy(), s_q.numpy())
    assert isinstance(from_numpy, torch.Tensor) and from_numpy.dtype == torch.float64 and from_numpy.ndim == 0
    assert from_torch.dtype == torch.float64 and from_torch.ndim == 0
    # float32 inputs are computed in float64: only the input rounding differs
    assert abs(float(from_torch) - float(from_numpy)) <= 1e-5 * float(from_numpy)


def test_identical_distributions_have_zero_distance():
    mu, s = _stats(500, 20, 3)
    assert abs(float(frechet_distance(mu, s, mu, s))) <= 1e-10 * float(s.trace())


def test_singular_commuting_covariances_match_closed_form():
    # Commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: FD = |dmu|^2 + sum (sqrt a - sqrt b)^2.
    d = 32
    q = _random_orthogonal(d, 7)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(d, generator=g, dtype=torch.float64) * 2
    a[:5] = 0.0  # singular reference
    b[3:20] = 0.0  # rank-deficient generated (rank 15 < d)
    mu_p = torch.randn(d, generator=g, dtype=torch.float64)
    mu_q = torch.randn(d, generator=g, dtype=torch.float64)
    s_p, s_q = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    s_p, s_q = (s_p + s_p.T) / 2, (s_q + s_q.T) / 2
    expected = float((mu_p - mu_q).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    ours = float(frechet_distance(mu_p, s_p, mu_q, s_q))
    # the zero eigenvalues come out as +-round-off, below the eigenvalue floor, and count as exactly 0;
    # the others are >= 0.1, so the result is accurate to round-off
    assert np.isfinite(ours)
    assert abs(ours - expected) <= 1e-10 * expected


def _mp_frechet(mu_p, s_p, mu_q, s_q, dps=50):
    """FD of the exact float64 inputs, computed with 50-digit symmetric eigen-decompositions."""
    with mpmath.workdps(dps):
        sp, sq = mpmath.matrix(s_p.tolist()), mpmath.matrix(s_q.tolist())
        lam, vec = mpmath.eigsy(sp)
        a = vec * mpmath.diag([mpmath.sqrt(max(x, 0)) for x in lam]) * vec.T
        m = a * sq * a
        m = (m + m.T) / 2
        tr_root = mpmath.fsum(mpmath.sqrt(max(x, 0)) for x in mpmath.eigsy(m, eigvals_only=True))
        tr = lambda x: mpmath.fsum(x[i, i] for i in range(x.rows))  # noqa: E731
        dmu = mpmath.fsum((mpmath.mpf(float(x)) - mpmath.mpf(float(y))) ** 2 for x, y in zip(mu_p, mu_q))
        return float(dmu + tr(sp) + tr(sq) - 2 * tr_root)


def test_ill_conditioned_non_commuting_matches_50_digit_reference():
    d = 8
    g = torch.Generator().manual_seed(5)
    s_p = _random_orthogonal(d, 11) @ torch.diag(torch.logspace(-12, 0, d, dtype=torch.float64)) @ _random_orthogonal(d, 11).T
    s_q = _random_orthogonal(d, 12) @ torch.diag(torch.logspace(-10, 1, d, dtype=torch.float64)) @ _random_orthogonal(d, 12).T
    s_p, s_q = (s_p + s_p.T) / 2, (s_q + s_q.T) / 2
    mu_p = torch.randn(d, generator=g, dtype=torch.float64)
    mu_q = mu_p + 1e-3 * torch.randn(d, generator=g, dtype=torch.float64)
    reference = _mp_frechet(mu_p.numpy(), s_p.numpy(), mu_q.numpy(), s_q.numpy())
    ours = float(frechet_distance(mu_p, s_p, mu_q, s_q))
    # same round-off bound as above with lam_max(A S_q A) <= 10
    assert abs(ours - reference) <= 4 * d * (d * F64_EPS * 10.0) ** 0.5
    assert abs(ours - reference) <= 1e-6 * abs(reference)


def test_value_path_without_grad_equals_grad_path_value():
    mu_p, s_p = _stats(300, 24, 0)
    mu_q, s_q = _stats(300, 24, 1)
    with torch.no_grad():
        plain = frechet_distance(mu_p, s_p, mu_q, s_q)
    with_grad = frechet_distance(mu_p, s_p, mu_q.requires_grad_(), s_q.requires_grad_())
    assert abs(float(plain) - float(with_grad.detach())) <= 1e-12 * float(plain)


def test_reference_factor_is_computed_once_and_reused(monkeypatch):
    calls = []
    real = reference_stats_module.reference_factor
    monkeypatch.setattr(reference_stats_module, "reference_factor", lambda s: calls.append(1) or real(s))
    mu_p, s_p = _stats(300, 16, 0)
    ref = ReferenceStats(mu=mu_p, sigma=s_p, num_samples=300)
    for seed in range(3):
        mu_q, s_q = _stats(100, 16, seed + 1)
        cached = frechet_distance_to_reference(ref, mu_q, s_q)
        assert abs(float(cached) - float(frechet_distance(mu_p, s_p, mu_q, s_q))) <= 1e-12 * float(cached)
    assert len(calls) == 1


def test_reference_factor_is_cholesky_when_positive_definite_and_the_root_when_singular():
    _, s_p = _stats(300, 40, 3)
    factor, lower = reference_factor(s_p)
    assert lower and torch.equal(factor, factor.tril())
    assert torch.allclose(factor @ factor.T, s_p, rtol=0, atol=1e-13 * float(s_p.abs().max()))
    x = torch.randn(10, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    singular = torch.cov(x.T)  # rank 9 in d = 40: no Cholesky factor exists
    factor, lower = reference_factor(singular)
    assert not lower and torch.equal(factor, sqrtm_psd(singular))


@pytest.mark.parametrize("d", [40, 600])  # 600: the CPU route's blocked triangular products, ragged last block
def test_cholesky_factor_route_equals_symmetric_root_route_in_value_and_gradient(d):
    # F = L (lower Cholesky) and F = A = S_p^1/2 differ by an orthogonal factor, so F^T S_q F has the
    # same eigenvalues and F (F^T S_q F)^-1/2 F^T is the same gradient term
    # condition numbers ~10 (random bases, spectra in [0.3, 3]): the two routes' round-off differs
    # by about eps * cond(F^T S_q F), so a tight tolerance tests the algebra, not the conditioning
    def stats(seed, shift):
        g = torch.Generator().manual_seed(seed)
        spectrum = torch.linspace(0.3, 3.0, d, dtype=torch.float64)
        s = _random_orthogonal(d, seed) @ torch.diag(spectrum) @ _random_orthogonal(d, seed).T
        return shift + torch.randn(d, generator=g, dtype=torch.float64), (s + s.T) / 2

    mu_p, s_p = stats(0, 0.0)
    mu_q, s_q = stats(1, 0.1)
    lower_factor, lower = reference_factor(s_p)
    assert lower
    grads, values = [], []
    for factor, is_lower in ((lower_factor, True), (sqrtm_psd(s_p), False)):
        mu, s = mu_q.clone().requires_grad_(), s_q.clone().requires_grad_()
        fd = frechet_distance_from_factor(mu_p, factor, s_p.trace(), mu, s, lower=is_lower)
        fd.backward()
        values.append(float(fd))
        grads.append(s.grad)
        with torch.no_grad():
            assert abs(float(frechet_distance_from_factor(mu_p, factor, s_p.trace(), mu_q, s_q, lower=is_lower)) - values[-1]) <= 1e-12 * values[-1]
    assert abs(values[0] - values[1]) <= 1e-12 * values[1]
    assert float((grads[0] - grads[1]).abs().max()) <= 1e-10 * float(grads[1].abs().max())


def test_slightly_asymmetric_generated_sigma_is_measured_by_its_symmetric_part():
    mu_p, s_p = _stats(1200, 600, 0)
    mu_q, s_q = _stats(1200, 600, 1)
    bump = torch.zeros_like(s_q)
    bump[5, 400] = 1e-6 * float(s_q.abs().max())  # float32-like round-off, accepted by validation
    fd_asym = frechet_distance(mu_p, s_p, mu_q, s_q + bump)
    fd_sym = frechet_distance(mu_p, s_p, mu_q, s_q + (bump + bump.T) / 2)
    assert abs(float(fd_asym) - float(fd_sym)) <= 1e-12 * float(fd_sym)


# ----------------------------------------------------------------------------- gradient


def test_gradcheck_float64_with_symmetrized_sigma_input():
    mu_p, s_p = _stats(100, 6, 0)
    mu_q, s_q = _stats(100, 6, 1, scale=1.3, shift=0.2)
    fn = lambda m, s: frechet_distance(mu_p, s_p, m, (s + s.mT) / 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mu_q.requires_grad_(), s_q.requires_grad_()))  # default tolerances


def test_gradcheck_float64_with_sigma_parameterized_as_b_b_transpose():
    mu_p, s_p = _stats(100, 5, 2)
    g = torch.Generator().manual_seed(3)
    b = torch.randn(5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mu_q = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda m, b: frechet_distance(mu_p, s_p, m, b @ b.mT + 0.1 * torch.eye(5, dtype=b.dtype))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mu_q, b))  # default tolerances


def test_closed_form_gradient_equals_autograd_through_eigvalsh_when_well_conditioned():
    mu_p, s_p = _stats(300, 20, 0)
    mu_q, s_q = _stats(300, 20, 1)
    a = sqrtm_psd(s_p)
    s1 = s_q.clone().requires_grad_()
    frechet_distance(mu_p, s_p, mu_q, s1).backward()
    s2 = s_q.clone().requires_grad_()
    m = a @ s2 @ a
    (s2.trace() - 2 * torch.linalg.eigvalsh((m + m.mT) / 2).sqrt().sum()).backward()
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-9, atol=1e-11)
    mu = mu_q.clone().requires_grad_()
    frechet_distance(mu_p, s_p, mu, s_q).backward()
    assert torch.allclose(mu.grad, 2 * (mu_q - mu_p), rtol=0, atol=1e-14)


def _gram_route_fd(mu_p, s_p, z):
    """FD for B < d samples through the (B-1) x (B-1) Gram matrix: smooth and full rank.

    With V an orthonormal basis of the vectors orthogonal to 1 and Y = V^T Z, S_q = Y^T Y / (B - 1),
    and the nonzero eigenvalues of A S_q A are those of Y S_p Y^T / (B - 1).
    """
    b = z.shape[0]
    centering = torch.eye(b, dtype=z.dtype) - 1.0 / b
    v = torch.linalg.qr(centering)[0][:, : b - 1]
    y = v.T @ z
    gram = y @ s_p @ y.T / (b - 1)
    return ((mu_p - z.mean(0)).square().sum() + s_p.trace() + (y * y).sum() / (b - 1)
            - 2 * torch.linalg.eigvalsh((gram + gram.T) / 2).sqrt().sum())


def test_rank_deficient_generated_covariance_gives_finite_exact_feature_gradient():
    # B = 10 generated samples in d = 32: S_q has rank 9, A S_q A has 23 zero eigenvalues (the
    # floored ones). FD stays a smooth function of the samples; its gradient through the full-rank
    # Gram route is the exact reference.
    d, b = 32, 10
    mu_p, s_p = _stats(400, d, 0)
    g = torch.Generator().manual_seed(9)
    z = torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_()
    fd = frechet_distance(mu_p, s_p, z.mean(0), torch.cov(z.T))
    fd.backward()
    ours = z.grad.clone()
    z.grad = None
    reference = _gram_route_fd(mu_p, s_p, z)
    reference.backward()
    assert torch.isfinite(ours).all()
    assert abs(float(fd.detach() - reference.detach())) <= 1e-12 * float(reference.detach())
    assert float((ours - z.grad).norm()) <= 1e-8 * float(z.grad.norm())


def test_rank_deficient_sigma_gradient_is_finite_and_floored():
    d = 16
    mu_p, s_p = _stats(200, d, 0)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, d, generator=g, dtype=torch.float64)
    s_q = torch.cov(x.T).requires_grad_()  # rank 3
    frechet_distance(mu_p, s_p, x.mean(0), s_q).backward()
    assert torch.isfinite(s_q.grad).all()
    a = sqrtm_psd(s_p)
    lam = torch.linalg.eigvalsh(a @ s_q.detach() @ a)
    # the null eigenvalues are floored at max(lam) * d * eps: the largest gradient entry is bounded by it
    bound = 1 + float(torch.linalg.matrix_norm(a, 2)) ** 2 / eigenvalue_floor(lam) ** 0.5
    assert float(s_q.grad.abs().max()) <= bound


# ----------------------------------------------------------------------------- errors


def test_mismatched_dims_raise_value_error_naming_the_fix():
    mu_p, s_p = _stats(100, 8, 0)
    mu_q, s_q = _stats(100, 6, 1)
    with pytest.raises(ValueError, match="feature dimensions differ.*same encoder"):
        frechet_distance(mu_p, s_p, mu_q, s_q)
    with pytest.raises(ValueError, match="mu has dimension 8 but sigma is"):
        frechet_distance(mu_p, s_p[:6, :6], mu_p, s_p)


def test_non_square_sigma_raises():
    mu, s = _stats(100, 8, 0)
    with pytest.raises(ValueError, match="square"):
        frechet_distance(mu, s[:, :7], mu, s)


def test_non_symmetric_sigma_raises_with_symmetrize_hint():
    mu, s = _stats(100, 8, 0)
    bad = s.clone()
    bad[0, 1] += 0.1 * float(s.abs().max())
    with pytest.raises(ValueError, match=r"not symmetric.*\(S \+ S.T\) / 2"):
        frechet_distance(mu, s, mu, bad)


def test_float32_round_off_asymmetry_is_accepted():
    x = torch.randn(1000, 64)
    xc = x - x.mean(0)
    s = xc.T @ xc / 999  # float32 BLAS product: symmetric only up to round-off
    validate_stats(x.mean(0), s, "generated")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["mu_p", "sigma_p", "mu_q", "sigma_q"])
def test_nan_and_inf_raise_naming_the_statistics(bad_value, where):
    mu, s = _stats(100, 6, 0)
    args = {"mu_p": mu.clone(), "sigma_p": s.clone(), "mu_q": mu.clone(), "sigma_q": s.clone()}
    args[where].view(-1)[0] = bad_value
    side = "reference" if where.endswith("_p") else "generated"
    with pytest.raises(ValueError, match=f"{side}: .*NaN or Inf"):
        frechet_distance(**args)


def test_reference_requiring_grad_raises():
    mu, s = _stats(100, 6, 0)
    with pytest.raises(ValueError, match="reference statistics are a constant"):
        frechet_distance(mu, s.clone().requires_grad_(), mu, s)


def test_sqrtm_psd_squares_back_and_rejects_non_psd():
    _, s = _stats(200, 12, 0)
    root = sqrtm_psd(s.numpy())
    assert root.dtype == torch.float64 and torch.equal(root, root.T)
    assert torch.allclose(root @ root, s, rtol=0, atol=1e-12 * float(s.abs().max()))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        sqrtm_psd(-s)
