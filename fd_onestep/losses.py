"""FD-loss: the Fréchet distance between a generated population and reference statistics.

``FDLoss`` handles one encoder; ``MultiEncoderFDLoss`` combines several with self-normalized weights

    L = sum_i w_i F_i / (sg(F_i) + eps_i),        eps_i = eps * tr(sigma_ref_i)

Self-normalization makes every encoder contribute a gradient of relative size ``w_i`` whatever its
FD scale (Inception FD ~ 1-300, DINOv2/SigLIP FD on normalized features ~ 0.01-1). ``eps_i`` only guards
against division by zero, so it must be tiny *relative to that encoder's scale*. The research code
uses an absolute ``eps = 0.01``: an encoder with FD 0.04 then gets the gradient weight
``1 / (0.04 + 0.01) = 20`` instead of ``1 / 0.04 = 25``, i.e. it is silently damped by 20%
(by 71% at FD 0.004), while an FD-40 encoder is untouched. Here eps is relative to
``tr(sigma_ref_i)`` -- the FD of a generator collapsed onto the reference mean, the natural FD scale of
that representation -- and defaults to 1e-6: for an encoder with ``tr(sigma_ref) = 1`` and FD 0.04
the damping is 0.04 / (0.04 + 1e-6) = 0.99998, and for Inception (``tr ~ 100``, FD 40) 0.999998.
"""

from __future__ import annotations

import math

import torch

from fd_onestep.moments import check_features
from fd_onestep.populations import ExactPopulation, Population
from fd_onestep.reference_stats import ReferenceStats

__all__ = ["FDLoss", "MultiEncoderFDLoss"]


class FDLoss(torch.nn.Module):
    """FD-loss for one encoder: ``features (B, d) -> FD(reference, population(features))``.

    Args:
        reference: reference statistics (its ``A = sigma^1/2`` is cached and reused every step).
        population: how the batch becomes population statistics (EMA / queue / exact); it is a
            submodule, so its state is part of this module's ``state_dict()``.

    ``forward`` returns a 0-dim float64 tensor: the FD value (squared feature units), differentiable
    w.r.t. ``features`` through the closed-form FD backward. ``last_fd`` keeps the last value as a float.
    Calling it advances the population (see each population's docstring).
    """

    def __init__(self, reference: ReferenceStats, population: Population):
        super().__init__()
        if not isinstance(reference, ReferenceStats):
            raise TypeError(
                f"reference must be a ReferenceStats, got {type(reference).__name__}; load one with "
                "ReferenceStats.load(path) or ReferenceStats.from_npz(path)."
            )
        if not isinstance(population, Population):
            raise TypeError(
                f"population must be a Population, got {type(population).__name__}; use build_population(...)."
            )
        if population.dim != reference.feature_dim:
            raise ValueError(
                f"population has dim {population.dim} but the reference statistics (encoder "
                f"{reference.encoder_id!r}) have feature_dim {reference.feature_dim}; build the population "
                "with the encoder's feature_dim."
            )
        self.reference = reference
        self.population = population
        self.last_fd: float = float("nan")
        self._exact_cache = None

    @property
    def scale(self) -> float:
        """``tr(sigma_ref)``: the FD scale of this representation (used for a relative eps)."""
        return float(self.reference.trace_sigma)

    def forward(self, features: torch.Tensor, *, update: bool = True) -> torch.Tensor:
        check_features(features, self.reference.feature_dim,
                       f"features for reference {self.reference.encoder_id or ''}".strip())
        mu, sigma = self.population(features, update=update)
        if isinstance(self.population, ExactPopulation) and (mu.requires_grad or sigma.requires_grad):
            loss = self._exact_micro_batch_loss(mu, sigma)
        else:
            loss = self.reference.frechet_distance(mu, sigma)
        self.last_fd = float(loss.detach())
        return loss

    def _exact_micro_batch_loss(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Pass-2 loss of an exact population with one eigen-decomposition per step, not per micro-batch.

        Every micro-batch sees the same statistics M (only the gradient path differs), so F(M) and its
        gradient (g_mu, g_sigma) are computed once per step and each micro-batch returns
        ``F(M) + <g_mu, mu - sg(mu)> + <g_sigma, sigma - sg(sigma)>``: value F(M), gradient exactly
        ``g . dM_i`` (what autograd through the full FD would give).
        """
        version = (id(self.population), self.population.version)
        if self._exact_cache is None or self._exact_cache[0] != version:
            mu0 = mu.detach().requires_grad_()
            sigma0 = sigma.detach().requires_grad_()
            with torch.enable_grad():
                value = self.reference.frechet_distance(mu0, sigma0)
                g_mu, g_sigma = torch.autograd.grad(value, (mu0, sigma0))
            self._exact_cache = (version, value.detach(), g_mu, g_sigma)
        _, value, g_mu, g_sigma = self._exact_cache
        return value + (g_mu * (mu - mu.detach())).sum() + (g_sigma * (sigma - sigma.detach())).sum()


class MultiEncoderFDLoss(torch.nn.Module):
    """Several encoders: ``L = sum_i w_i F_i / (sg(F_i) + eps_i)``, ``eps_i = eps * tr(sigma_ref_i)``.

    Args:
        losses: encoder name -> :class:`FDLoss`.
        weights: encoder name -> w_i (default 1 for every encoder; missing names get 1).
        eps: relative guard, see the module docstring (default 1e-6; absolute eps_i = eps * tr(sigma_ref_i)).

    ``forward(features: dict[name, (B, d_i) tensor]) -> (loss 0-dim float64, {name: raw FD float})``.
    The loss value is about ``sum_i w_i``; log the raw FDs.
    """

    def __init__(self, losses: dict[str, FDLoss], weights: dict[str, float] | None = None, eps: float = 1e-6):
        super().__init__()
        if not losses:
            raise ValueError("MultiEncoderFDLoss needs at least one FDLoss (encoder name -> FDLoss).")
        for name, loss in losses.items():
            if not isinstance(loss, FDLoss):
                raise TypeError(f"losses[{name!r}] must be an FDLoss, got {type(loss).__name__}.")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(losses))
        if unknown:
            raise ValueError(
                f"weights given for unknown encoder(s) {unknown}; the losses are for {sorted(losses)}."
            )
        for name, w in weights.items():
            if not (math.isfinite(float(w)) and float(w) >= 0):
                raise ValueError(f"weight for {name!r} must be a finite number >= 0, got {w}.")
        if not (math.isfinite(float(eps)) and float(eps) > 0):
            raise ValueError(f"eps must be a small positive number (relative to tr(sigma_ref)), got {eps}.")
        self.losses = torch.nn.ModuleDict(losses)
        self.weights = {name: float(weights.get(name, 1.0)) for name in losses}
        self.eps = float(eps)

    def eps_for(self, name: str) -> float:
        """Absolute eps_i of encoder ``name``: ``eps * tr(sigma_ref_i)``."""
        return self.eps * self.losses[name].scale

    def forward(self, features: dict[str, torch.Tensor], *, update: bool = True):
        if not isinstance(features, dict):
            raise TypeError("features must be a dict {encoder name: (B, d) tensor}, one entry per encoder.")
        missing = sorted(set(self.losses) - set(features))
        extra = sorted(set(features) - set(self.losses))
        if missing or extra:
            raise ValueError(
                f"features are for encoders {sorted(features)} but the loss expects {sorted(self.losses)} "
                f"(missing {missing}, unexpected {extra}); pass one feature tensor per configured encoder."
            )
        total = None
        raw: dict[str, float] = {}
        for name, loss_fn in self.losses.items():
            fd = loss_fn(features[name], update=update)
            raw[name] = float(fd.detach())
            term = self.weights[name] * fd / (fd.detach() + self.eps_for(name))
            total = term if total is None else total + term
        return total, raw
