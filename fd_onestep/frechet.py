"""Exact Fréchet distance between Gaussians, through the symmetric route, with a closed-form gradient.

    FD(p, q) = |mu_p - mu_q|^2 + tr(S_p) + tr(S_q) - 2 tr((A S_q A)^1/2),     A = S_p^1/2

``A S_q A`` is symmetric positive semi-definite and similar to ``S_p S_q``, so one symmetric
eigen-decomposition (``eigvalsh`` for the value, ``eigh`` when a gradient is needed) replaces the
non-symmetric ``scipy.linalg.sqrtm(S_p @ S_q)`` of pytorch-fid: it is real, never returns complex
round-off, and stays finite for singular covariances.

Reference factor. Any ``F`` with ``F F^T = S_p`` may stand in for ``A``: ``F = A Q`` with ``Q``
orthogonal, so ``F^T S_q F = Q^T (A S_q A) Q`` has the same eigenvalues, and
``F (F^T S_q F)^-1/2 F^T = A (A S_q A)^-1/2 A`` is the same gradient term. We use the lower Cholesky
factor ``L`` whenever ``S_p`` is numerically positive definite (the usual case for encoder features)
and the symmetric root ``A`` otherwise (singular references): the Cholesky factor costs d^3/3 flops
instead of a d x d ``eigh``, and on the CPU ``L^T S_q L`` skips the zero blocks of ``L``, about a
third of the flops of the two full matmuls that ``A S_q A`` needs. The factor belongs to the
reference and is computed once (see
:class:`fd_onestep.reference_stats.ReferenceStats`).

Gradient (custom backward, float64):

    dF/dmu_q = 2 (mu_q - mu_p)
    dF/dS_q  = I - A U diag(max(lambda, floor)^-1/2) U^T A,      A S_q A = U diag(lambda) U^T

Eigenvalue floor: ``floor = max(lambda_max, tiny) * d * eps_float64`` (about 4.5e-13 * lambda_max at
d = 2048), i.e. the round-off level of an eigenvalue of a d x d float64 matrix. Eigenvalues below it
are numerically zero (a rank-deficient S_q, e.g. fewer samples than dimensions, or a singular S_p):
the value counts them as 0 and the backward floors them, which keeps the gradient finite. For S_q
built from features, ``A u`` of a null eigenvector ``u`` is orthogonal to every centred feature, so
those (large but finite) entries multiply zero in the feature gradient.

Counting them as 0 is what keeps the value exact, not an approximation: float64 computes a zero
eigenvalue of ``F^T S_q F`` as +-round-off (~eps * lambda_max), and the square root turns that into
~sqrt(eps * lambda_max) per eigenvalue, always positive. Routes that keep them (``max(lambda, 0)``,
``scipy.linalg.sqrtm``, the roots of ``eigvals(S_p S_q)``) therefore agree with one another and are
all biased low. Measured on the bundled singular ``pixels-digits`` reference (d = 256, rank about 60:
16x16 upscaled 8x8 digits) against 1,000 real digits: 196 of the 256 eigenvalues are round-off
(<= 8.5e-15, floor 3.2e-12; the smallest real one is 2.2e-10); this route gives FD 0.47462757757,
within 2.7e-10 (relative) of the 50-digit value of the same float64 statistics (mpmath, symmetric
root route: 0.47462757744; python-flint, 170-bit ``eig(S_p S_q)``: 0.47462757757 -- the two differ
by one eigenvalue of ~1e-21 whose sign depends on how the -1e-15 round-off eigenvalues of the given,
not quite PSD, ``S_p`` are treated), while keeping the round-off eigenvalues gives 0.474622, 1.2e-5
too low (``tests/test_frechet_precision.py``).

All functions take numpy arrays or torch tensors and compute in float64. The reference side (mu_p,
S_p) is a constant: asking for its gradient raises a ``ValueError``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "frechet_distance",
    "frechet_distance_to_reference",
    "frechet_distance_from_factor",
    "reference_factor",
    "sqrtm_psd",
    "validate_stats",
    "eigenvalue_floor",
]

_F64_EPS = torch.finfo(torch.float64).eps
_F64_TINY = torch.finfo(torch.float64).tiny
# A covariance may come from float32 features through a BLAS gemm, which is not bitwise symmetric.
_SYMMETRY_RTOL = 1e-5
# sqrtm_psd clamps negative round-off eigenvalues; anything more negative than this (relative to the
# largest eigenvalue) is not a covariance matrix at all.
_PSD_RTOL = 1e-3


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        arr = np.asarray(x)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{name} has dtype {arr.dtype}; pass a real float array (numpy or torch).")
        return torch.from_numpy(np.ascontiguousarray(arr))
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}.")


def validate_stats(mu, sigma, name: str = "stats") -> bool:
    """Check a Gaussian's statistics; raise ``ValueError`` naming the problem and the fix.

    Args:
        mu: mean, shape (d,).
        sigma: covariance, shape (d, d), symmetric (max |S - S^T| <= 1e-5 * max |S|, the float32
            round-off of a covariance computed by a matrix product) and finite.
        name: what to call these statistics in the message (e.g. "reference", "generated").

    Returns:
        whether ``sigma`` is exactly (bitwise) symmetric; pass it on as ``symmetric`` to
        :func:`frechet_distance_from_factor` with ``validate=False`` to skip testing it again.
    """
    return _validate(mu, sigma, name)


def _validate(mu, sigma, name: str) -> bool:
    mu = _as_tensor(mu, f"{name} mu")
    sigma = _as_tensor(sigma, f"{name} sigma")
    if mu.ndim != 1:
        raise ValueError(
            f"{name}: mu must be a vector of shape (d,), got shape {tuple(mu.shape)}; "
            "pass the feature mean (e.g. features.mean(0)), not the features themselves."
        )
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(
            f"{name}: sigma must be a square (d, d) covariance matrix, got shape {tuple(sigma.shape)}; "
            "pass the covariance of the features (e.g. numpy.cov(features, rowvar=False))."
        )
    if sigma.shape[0] != mu.shape[0]:
        raise ValueError(
            f"{name}: mu has dimension {mu.shape[0]} but sigma is {tuple(sigma.shape)}; "
            "mu and sigma must come from the same features (same encoder and feature dimension)."
        )
    if not bool(torch.isfinite(mu).all()):
        raise ValueError(
            f"{name}: mu contains NaN or Inf; recompute the statistics from finite features "
            "(check the encoder output and the input images)."
        )
    if sigma.numel() > 0:
        s = sigma.detach()
        # one fused pass: min/max are NaN or +-Inf exactly when some entry is
        lo, hi = (float(v) for v in torch.aminmax(s))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(
                f"{name}: sigma contains NaN or Inf; recompute the statistics from finite features "
                "(check the encoder output and the input images)."
            )
        if torch.equal(s, s.mT):  # the common case (our own covariances are exactly symmetric)
            return True
        scale = max(abs(lo), abs(hi))
        asym = float((s - s.mT).abs().max())
        rtol = max(_SYMMETRY_RTOL, 10 * torch.finfo(s.dtype).eps) if s.is_floating_point() else 0.0
        if asym > rtol * max(scale, _F64_TINY):
            raise ValueError(
                f"{name}: sigma is not symmetric (max |S - S^T| = {asym:.3e}, max |S| = {scale:.3e}); "
                "a covariance matrix must be symmetric: pass a covariance, or symmetrize it with (S + S.T) / 2."
            )
        return False
    return True


def _check_pair(mu_p: torch.Tensor, mu_q: torch.Tensor) -> None:
    if mu_p.shape != mu_q.shape:
        raise ValueError(
            f"feature dimensions differ: reference has d={mu_p.shape[0]}, generated has d={mu_q.shape[0]}; "
            "compute both statistics with the same encoder (same feature dimension)."
        )


def sqrtm_psd(sigma) -> torch.Tensor:
    """Symmetric PSD square root ``sigma^1/2`` in float64 via ``torch.linalg.eigh``.

    Args:
        sigma: (d, d) symmetric positive semi-definite matrix (numpy or torch, any float dtype).

    Returns:
        (d, d) float64 tensor ``V diag(sqrt(max(lambda, 0))) V^T``, exactly symmetric. Negative
        round-off eigenvalues are clamped to 0; an eigenvalue below ``-1e-3 * lambda_max`` means the
        input is not a covariance and raises ``ValueError``.
    """
    sigma = _as_tensor(sigma, "sigma").detach().to(torch.float64)
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"sqrtm_psd needs a square (d, d) matrix, got shape {tuple(sigma.shape)}.")
    if not bool(torch.isfinite(sigma).all()):
        raise ValueError("sqrtm_psd: the matrix contains NaN or Inf; pass finite covariance statistics.")
    sym = (sigma + sigma.mT) * 0.5
    lam, vec = torch.linalg.eigh(sym)
    if lam.numel():
        lam_max = float(lam.abs().max())
        if float(lam.min()) < -_PSD_RTOL * lam_max:
            raise ValueError(
                f"sqrtm_psd: the matrix has eigenvalue {float(lam.min()):.3e} (largest {lam_max:.3e}), "
                "so it is not positive semi-definite; pass a covariance matrix."
            )
    half = vec * lam.clamp(min=0).pow(0.25)
    root = half @ half.mT
    return (root + root.mT) * 0.5


def eigenvalue_floor(eigenvalues: torch.Tensor) -> float:
    """The eigenvalue floor of the backward: ``max(lambda_max, tiny) * d * eps_float64``."""
    d = eigenvalues.shape[-1]
    lam_max = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
    return max(lam_max, _F64_TINY) * max(d, 1) * _F64_EPS


def reference_factor(sigma_p) -> tuple[torch.Tensor, bool]:
    """A factor ``F`` of the reference covariance, ``F F^T = S_p``, for the FD route.

    Args:
        sigma_p: (d, d) symmetric positive semi-definite reference covariance (any float dtype).

    Returns:
        ``(F, lower)``: (d, d) float64 contiguous ``F``, and ``lower=True`` when ``F`` is the lower
        Cholesky factor (``S_p`` numerically positive definite; costs d^3/3 flops) or ``False`` when
        it is the symmetric root ``A = S_p^1/2`` of :func:`sqrtm_psd` (``S_p`` singular, e.g. fewer
        reference samples than dimensions). Both give the same FD and gradient (module docstring).
    """
    sigma_p = _as_tensor(sigma_p, "reference sigma").detach().to(torch.float64)
    if sigma_p.ndim != 2 or sigma_p.shape[0] != sigma_p.shape[1]:
        raise ValueError(f"reference_factor needs a square (d, d) matrix, got shape {tuple(sigma_p.shape)}.")
    if sigma_p.numel():
        lower, info = torch.linalg.cholesky_ex((sigma_p + sigma_p.mT) * 0.5)
        if int(info) == 0 and bool(torch.isfinite(lower).all()):
            return lower.contiguous(), True
    return sqrtm_psd(sigma_p).contiguous(), False


# Column/row block width of the triangular products below: wide enough for an efficient gemm per
# block, narrow enough that skipping the zero blocks of L saves most of their flops.
_TRIANGULAR_BLOCK = 256


def _blocked_pays(matrix: torch.Tensor) -> bool:
    """Whether the block-triangular products below beat one plain matmul: CPU and d >= 2 blocks."""
    return matrix.device.type == "cpu" and matrix.shape[0] >= 2 * _TRIANGULAR_BLOCK


def _congruence_lower(lower_factor: torch.Tensor, sym: torch.Tensor) -> torch.Tensor:
    """``L^T S L`` for lower-triangular ``L`` and symmetric ``S`` (d, d), in the lower triangle.

    torch has no ``trmm``, so the products run block by block, skipping the zero blocks of ``L``:
    ``T = S L`` costs about half a gemm and the lower triangle of ``L^T T`` about a sixth, against the
    two full gemms of ``F^T S F``. The strict upper triangle of the result is zero.
    """
    d = sym.shape[0]
    b = _TRIANGULAR_BLOCK
    t = torch.empty_like(sym)
    for j in range(0, d, b):  # column block j of S L only meets rows j: of L
        e = min(j + b, d)
        torch.mm(sym[:, j:], lower_factor[j:, j:e], out=t[:, j:e])
    out = torch.zeros_like(sym)
    for i in range(0, d, b):  # row block i of L^T T only meets rows i: of T; keep columns :e
        e = min(i + b, d)
        torch.mm(lower_factor[i:, i:e].mT, t[i:, :e], out=out[i:e, :e])
    return out


def _lower_matmul(lower_factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``L @ X`` for lower-triangular (d, d) ``L``, skipping its zero blocks on the CPU."""
    if not _blocked_pays(lower_factor):
        return lower_factor @ x
    d = lower_factor.shape[0]
    out = torch.empty(d, x.shape[1], dtype=x.dtype)
    for i in range(0, d, _TRIANGULAR_BLOCK):
        e = min(i + _TRIANGULAR_BLOCK, d)
        torch.mm(lower_factor[i:e, :e], x[:e], out=out[i:e])
    return out


def _sandwich(factor: torch.Tensor, sigma_q: torch.Tensor, lower: bool, symmetric: bool | None) -> torch.Tensor:
    """``F^T sym(S_q) F`` (d, d) float64; eigvalsh/eigh read only its lower triangle.

    ``symmetric``: whether ``S_q`` is already known to be exactly symmetric (None: test it).
    """
    # sym(S_q) exactly, so the function differentiated is that of the symmetric part; our own
    # covariances are exactly symmetric already, which validation has usually seen
    if symmetric is None:
        symmetric = torch.equal(sigma_q, sigma_q.mT)
    sym = sigma_q if symmetric else (sigma_q + sigma_q.mT) * 0.5
    if lower and _blocked_pays(sym):
        return _congruence_lower(factor, sym.contiguous())
    m = factor.mT @ sym @ factor
    # exact symmetry, so eigh/eigvalsh see precisely the matrix whose trace root we want
    return torch.add(m, m.mT).mul_(0.5)


def _value(mu_q, sigma_q, mu_p, trace_sigma_p, lam) -> torch.Tensor:
    diff = mu_q - mu_p
    # eigenvalues below the floor are round-off (float64 cannot resolve them): count them as 0
    tr_sqrt = torch.where(lam > eigenvalue_floor(lam), lam, 0.0).sqrt().sum()
    return diff.dot(diff) + trace_sigma_p + sigma_q.diagonal().sum() - 2.0 * tr_sqrt


class _FrechetDistanceFunction(torch.autograd.Function):
    """FD with the closed-form backward w.r.t. (mu_q, sigma_q); the reference side is constant."""

    @staticmethod
    def forward(ctx, mu_q, sigma_q, mu_p, factor, trace_sigma_p, lower, symmetric):
        m = _sandwich(factor, sigma_q, lower, symmetric)
        if ctx.needs_input_grad[1]:
            lam, vec = torch.linalg.eigh(m)
        else:
            lam, vec = torch.linalg.eigvalsh(m), None
        value = _value(mu_q, sigma_q, mu_p, trace_sigma_p, lam)
        ctx.save_for_backward(mu_q - mu_p, factor, lam, vec if vec is not None else lam)
        ctx.has_vec = vec is not None
        ctx.lower = lower
        return value

    @staticmethod
    def backward(ctx, grad_out):
        diff, factor, lam, vec = ctx.saved_tensors
        grad_mu = grad_sigma = None
        if ctx.needs_input_grad[0]:
            grad_mu = 2.0 * grad_out * diff
        if ctx.needs_input_grad[1] and ctx.has_vec:
            floor = eigenvalue_floor(lam)
            # F U diag(lam^-1/2) U^T F^T = W W^T with W = F U diag(lam^-1/4): two matrix products
            w = (_lower_matmul(factor, vec) if ctx.lower else factor @ vec) * lam.clamp(min=floor).pow(-0.25)
            g = -(w @ w.mT)
            g = (g + g.mT) * 0.5
            g.diagonal().add_(1.0)
            grad_sigma = grad_out * g
        return grad_mu, grad_sigma, None, None, None, None, None


def frechet_distance_from_factor(
    mu_p: torch.Tensor,
    factor_p: torch.Tensor,
    trace_sigma_p: torch.Tensor | float,
    mu_q,
    sigma_q,
    *,
    lower: bool = False,
    validate: bool = True,
    symmetric: bool | None = None,
) -> torch.Tensor:
    """FD when a factor ``F`` of the reference covariance (``F F^T = S_p``) is already known (the hot path).

    Args:
        mu_p: (d,) float64 reference mean.
        factor_p: (d, d) float64 contiguous ``F`` from :func:`reference_factor`: the lower Cholesky
            factor (``lower=True``) or any other factor such as ``A = S_p^1/2``.
        trace_sigma_p: ``tr(S_p)`` (float or 0-dim float64 tensor).
        mu_q, sigma_q: (d,), (d, d) generated statistics; may require grad.
        lower: ``factor_p`` is lower triangular (lets the CPU route skip its zero blocks).
        validate: check mu_q/sigma_q (shape, symmetry, finiteness, same d as mu_p); costs two passes
            over sigma_q.
        symmetric: with ``validate=False``, whether sigma_q is known to be exactly symmetric (what
            :func:`validate_stats` returned); None tests it (one pass). Ignored when validating.

    Returns:
        0-dim float64 tensor on the device of ``mu_p``, differentiable w.r.t. mu_q and sigma_q
        (closed-form backward).
    """
    mu_q = _as_tensor(mu_q, "generated mu")
    sigma_q = _as_tensor(sigma_q, "generated sigma")
    if validate:
        symmetric = _validate(mu_q, sigma_q, "generated")
        _check_pair(mu_p, mu_q)
    return _distance(mu_p, factor_p, trace_sigma_p, mu_q, sigma_q, lower, symmetric)


def _distance(mu_p, factor_p, trace_sigma_p, mu_q, sigma_q, lower: bool, symmetric: bool | None) -> torch.Tensor:
    # (casting and moving keep exact symmetry, so a validated ``symmetric`` still holds below)
    device = mu_p.device
    mu_q = mu_q.to(device=device, dtype=torch.float64)
    sigma_q = sigma_q.to(device=device, dtype=torch.float64)
    trace_sigma_p = torch.as_tensor(trace_sigma_p, dtype=torch.float64, device=device)
    if torch.is_grad_enabled() and (mu_q.requires_grad or sigma_q.requires_grad):
        return _FrechetDistanceFunction.apply(
            mu_q, sigma_q, mu_p, factor_p, trace_sigma_p, bool(lower), symmetric
        )
    with torch.no_grad():
        lam = torch.linalg.eigvalsh(_sandwich(factor_p, sigma_q, lower, symmetric))
        return _value(mu_q, sigma_q, mu_p, trace_sigma_p, lam)


def _reject_reference_grad(mu_p, sigma_p) -> None:
    for name, t in (("mu_p", mu_p), ("sigma_p", sigma_p)):
        if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name} requires grad, but the reference statistics are a constant of FD-loss and "
                f"frechet_distance differentiates only w.r.t. mu_q and sigma_q; pass {name}.detach() "
                "(or swap the arguments if the differentiable statistics are the generated ones)."
            )


def frechet_distance(mu_p, sigma_p, mu_q, sigma_q) -> torch.Tensor:
    """Fréchet distance ``FD(N(mu_p, S_p), N(mu_q, S_q))`` in float64 (symmetric eigen route).

    Args:
        mu_p: (d,) reference mean (numpy or torch, any float dtype). Constant: no gradient.
        sigma_p: (d, d) reference covariance. Constant: no gradient.
        mu_q: (d,) generated mean; may require grad.
        sigma_q: (d, d) generated covariance; may require grad.

    Returns:
        0-dim float64 tensor (on the device of ``mu_p``), in squared feature units, differentiable
        w.r.t. ``mu_q`` and ``sigma_q`` through the closed-form backward of the module docstring.

    Raises:
        ValueError: mismatched dims, non-square or non-symmetric sigma, NaN/Inf, or a reference that
            requires grad.

    For repeated distances to the same reference, use :class:`ReferenceStats` (it caches the factor).
    """
    mu_p = _as_tensor(mu_p, "reference mu")
    sigma_p = _as_tensor(sigma_p, "reference sigma")
    mu_q = _as_tensor(mu_q, "generated mu")
    sigma_q = _as_tensor(sigma_q, "generated sigma")
    _reject_reference_grad(mu_p, sigma_p)
    validate_stats(mu_p, sigma_p, "reference")
    symmetric = _validate(mu_q, sigma_q, "generated")
    _check_pair(mu_p, mu_q)
    mu_p = mu_p.detach().to(torch.float64)
    sigma_p = sigma_p.detach().to(torch.float64)
    factor_p, lower = reference_factor(sigma_p)
    return _distance(mu_p, factor_p, sigma_p.diagonal().sum(), mu_q, sigma_q, lower, symmetric)


def frechet_distance_to_reference(reference, mu_q, sigma_q) -> torch.Tensor:
    """``reference.frechet_distance(mu_q, sigma_q)``: FD to a :class:`~fd_onestep.reference_stats.ReferenceStats`.

    Kept as a function for callers that prefer one; the reference owns its cached factor and calls
    :func:`frechet_distance_from_factor` (this module does not depend on ``reference_stats``).

    Args:
        reference: reference statistics (anything with a ``frechet_distance(mu_q, sigma_q)`` method).
        mu_q: (d,) generated mean (numpy or torch); may require grad.
        sigma_q: (d, d) generated covariance; may require grad.

    Returns:
        0-dim float64 tensor on the device of ``mu_q`` (torch input) or the CPU (numpy input).
    """
    return reference.frechet_distance(mu_q, sigma_q)

