"""Streaming float64 raw moments of features: count, sum z, sum z z^T.

Raw moments add up exactly across chunks, processes (``all_reduce``) and files (``merge``), so
statistics of 50k samples are computed in chunks without ever holding all features. The covariance
``(sum zz^T - n mu mu^T) / (n - 1)`` is formed only at the end, in float64 (relative cancellation
error ~1e-16 * |mu|^2 / var, negligible for encoder features).

The two formulas every estimator of :mod:`fd_onestep.populations` shares live here:
:func:`raw_sums` (the raw moments of one chunk) and :func:`covariance_from_moments` (the covariance
from raw moments, for equal or unequal sample weights).
"""

from __future__ import annotations

import torch

from fd_onestep.distributed import all_reduce_sum

__all__ = ["FeatureMoments", "check_features", "covariance_from_moments", "raw_sums"]


def check_features(features: torch.Tensor, dim: int | None, name: str = "features") -> None:
    """Raise ``ValueError`` unless ``features`` is a finite (B, dim) tensor."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, d), got {type(features).__name__}.")
    if features.ndim != 2:
        raise ValueError(
            f"{name} must have shape (B, d), got {tuple(features.shape)}; flatten or pool the encoder "
            "output to one feature vector per sample (e.g. features.flatten(1))."
        )
    if dim is not None and features.shape[1] != dim:
        raise ValueError(
            f"{name} have dimension {features.shape[1]} but {dim} was expected; use the encoder the "
            "statistics were built for (its feature_dim must match the reference statistics)."
        )
    if not features.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got dtype {features.dtype}; cast with .float().")
    if not bool(torch.isfinite(features.detach()).all()):
        raise ValueError(
            f"{name} contain NaN or Inf; check the generator output (diverged training?) and the "
            "encoder input range ([-1, 1] images)."
        )


def raw_sums(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_j z_j (d,), sum_j z_j z_j^T (d, d))`` of a (B, d) chunk, in the dtype of ``z``.

    Pass float64 features (the sums are the raw moments that every estimator accumulates);
    differentiable w.r.t. ``z``.
    """
    return z.sum(dim=0), z.mT @ z


def covariance_from_moments(
    mean: torch.Tensor, sum_outer: torch.Tensor, total_weight: float, denominator: float
) -> torch.Tensor:
    """``(sum_outer - W mu mu^T) / denominator``, exactly symmetric: a covariance from raw moments.

    For samples ``z_j`` with weights ``w_j`` (total ``W = sum_j w_j``, ``mu = sum_j w_j z_j / W``),
    ``sum_outer = sum_j w_j z_j z_j^T`` gives the scatter ``sum_j w_j (z_j - mu)(z_j - mu)^T`` in the
    numerator. The caller picks the normalization:

    - n equal samples (``w_j = 1``): ``W = n`` with ``denominator = n - 1`` (unbiased, ``numpy.cov``)
      or ``n`` (biased);
    - normalized weights (``W = 1``, e.g. an EMA, ``sum_outer = E[z z^T]``): ``denominator = 1 - V2``
      with ``V2 = sum_j w_j^2``, the unbiased estimator for reliability weights (it is ``1 - 1/n``
      for n equal weights, i.e. the ``n - 1`` of ``numpy.cov`` once divided by n).

    Args:
        mean: (d,) float64 weighted mean ``mu``.
        sum_outer: (d, d) float64 weighted sum of outer products.
        total_weight: W (a number; n for plain samples, 1 for normalized weights).
        denominator: the normalization (a positive number).

    Returns:
        (d, d) float64 covariance, ``(S + S^T) / 2`` so that it is bitwise symmetric; differentiable
        w.r.t. ``mean`` and ``sum_outer``.
    """
    cov = (sum_outer - total_weight * torch.outer(mean, mean)) / denominator
    return (cov + cov.mT) * 0.5


class FeatureMoments:
    """Float64 accumulator of the raw moments of d-dimensional features.

    Attributes:
        dim: feature dimension d.
        count: number of samples seen (int).
        sum: (d,) float64, sum of features.
        sum_outer: (d, d) float64, sum of outer products z z^T.

    Example::

        moments = FeatureMoments(2048, device=accelerator.device)
        for images in loader:
            moments.update(encoder(images))
        moments.all_reduce()              # sum over processes (no-op when not distributed)
        mu, sigma = moments.mean, moments.covariance()

    Device: the sums live on ``device``, where :meth:`update` moves the features and where
    :meth:`all_reduce` runs its collective (under NCCL it must be the process's CUDA device). With
    ``device=None`` the sums are created on the device of the first features handed to :meth:`update`
    (or the first moments handed to :meth:`merge`), so ``FeatureMoments(d)`` fed with an encoder's
    features reduces where the encoder runs; until then they are on torch's default device.
    """

    def __init__(self, dim: int, *, device: torch.device | str | None = None):
        if int(dim) <= 0:
            raise ValueError(f"dim must be a positive feature dimension, got {dim}.")
        self.dim = int(dim)
        self.count = 0
        # device=None: adopt the device of the first data (see the class docstring)
        self._adopt_device = device is None
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    def _settle_device(self, device: torch.device) -> None:
        """On first data with ``device=None``: create the (still zero) sums on ``device``."""
        if self._adopt_device:
            self._adopt_device = False
            if self.count == 0 and self.sum.device != device:
                self.sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
                self.sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    @classmethod
    def from_features(cls, features: torch.Tensor) -> "FeatureMoments":
        """Moments of one (B, d) tensor of features."""
        check_features(features, None)
        moments = cls(features.shape[1], device=features.device)
        moments.update(features)
        return moments

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> "FeatureMoments":
        """Add a (B, d) chunk of features (any float dtype; detached, accumulated in float64)."""
        check_features(features, self.dim)
        self._settle_device(features.device)
        z = features.detach().to(device=self.sum.device, dtype=torch.float64)
        s1, s2 = raw_sums(z)
        self.count += int(z.shape[0])
        self.sum += s1
        # z^T z is not bitwise symmetric with every BLAS (it was not on an AMD EPYC's): keep the accumulator
        # exactly symmetric, so that statistics files, which store its upper triangle, load back the same numbers
        self.sum_outer += (s2 + s2.mT) / 2
        return self

    @property
    def mean(self) -> torch.Tensor:
        """(d,) float64 mean."""
        self._require(1)
        return self.sum / self.count

    @property
    def second_moment(self) -> torch.Tensor:
        """(d, d) float64 ``E[z z^T]``."""
        self._require(1)
        return self.sum_outer / self.count

    def covariance(self, unbiased: bool = True) -> torch.Tensor:
        """(d, d) float64 covariance, exactly symmetric.

        ``unbiased=True`` divides by n - 1, matching ``numpy.cov(features, rowvar=False)`` (what
        pytorch-fid uses for reference statistics); ``unbiased=False`` divides by n.
        """
        self._require(2 if unbiased else 1)
        return covariance_from_moments(self.mean, self.sum_outer, self.count,
                                       self.count - 1 if unbiased else self.count)

    def all_reduce(self) -> "FeatureMoments":
        """Sum the moments over ``torch.distributed`` processes in place (no-op when not distributed).

        Collective: every process must call it. It runs on the device of the sums (class docstring).
        """
        packed = torch.cat(
            [
                torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device),
                self.sum,
                self.sum_outer.reshape(-1),
            ]
        )
        packed = all_reduce_sum(packed)
        self.count = int(round(float(packed[0])))
        self.sum = packed[1 : 1 + self.dim].clone()
        self.sum_outer = packed[1 + self.dim :].reshape(self.dim, self.dim).clone()
        return self

    def merge(self, other: "FeatureMoments") -> "FeatureMoments":
        """Add another accumulator's moments into this one (same dim)."""
        if not isinstance(other, FeatureMoments):
            raise TypeError(f"merge expects a FeatureMoments, got {type(other).__name__}.")
        if other.dim != self.dim:
            raise ValueError(
                f"cannot merge moments of dimension {other.dim} into dimension {self.dim}; "
                "merge only moments of the same encoder."
            )
        self._settle_device(other.sum.device)
        self.count += other.count
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum_outer.device)
        return self

    def copy(self) -> "FeatureMoments":
        out = FeatureMoments(self.dim, device=self.sum.device)
        out.merge(self)
        return out

    def to(self, device) -> "FeatureMoments":
        self._adopt_device = False
        self.sum = self.sum.to(device)
        self.sum_outer = self.sum_outer.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only: ``count`` (0-dim int64), ``sum`` (d,), ``sum_outer`` (d, d)."""
        return {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "sum": self.sum.clone(),
            "sum_outer": self.sum_outer.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = {"count", "sum", "sum_outer"} - set(state)
        if missing:
            raise ValueError(f"FeatureMoments state is missing {sorted(missing)}; pass a dict from state_dict().")
        if tuple(state["sum"].shape) != (self.dim,):
            raise ValueError(
                f"FeatureMoments state has dimension {tuple(state['sum'].shape)}, expected ({self.dim},); "
                "load a state saved for the same feature dimension."
            )
        self.count = int(state["count"])
        self.sum = state["sum"].to(device=self.sum.device, dtype=torch.float64).clone()
        self.sum_outer = state["sum_outer"].to(device=self.sum.device, dtype=torch.float64).clone()

    def _require(self, n: int) -> None:
        if self.count < n:
            raise ValueError(
                f"FeatureMoments has {self.count} sample(s) but needs at least {n}; "
                "call update() with more features first."
            )

    def __repr__(self) -> str:
        return f"FeatureMoments(dim={self.dim}, count={self.count})"
