"""Population estimators of the generated feature statistics for FD-loss.

FD needs a large population (tens of thousands of samples) but a training step sees a small batch.
A population turns the current batch's features into statistics (mu (d,), sigma (d, d), float64) of
a large population in which **only the current batch carries gradient**; the rest is stop-gradient
(``sg``). Everything is kept as float64 raw moments (mean and ``E[z z^T]``), which add exactly.

Three estimators:

=================  ==================================================  ================================
kind               population                                          covariance normalization
=================  ==================================================  ================================
``EMAPopulation``  ``m_t = beta sg(m_{t-1}) + (1 - beta) m_batch`` for  ``(E - mu mu^T) / (1 - V2)``
                   both moments ``m = (mu, E[zz^T])``; warm-started      (reliability weights, V2 = sum
                   from the exact moments of N samples                  of squared sample weights)
``QueuePopulation``current batch + the last ``queue_size`` stored        ``/(n - 1)`` (numpy.cov)
                   samples (FIFO, stop-gradient)
``ExactPopulation``the whole large batch of k micro-batches, two-pass    ``/(n - 1)`` (numpy.cov)
                   (exact large-batch gradient, one micro-batch of
                   activations at a time)
=================  ==================================================  ================================

Why these normalizations: the reference statistics use ``numpy.cov`` (``/(n - 1)``, as pytorch-fid),
so the generated side must be the same estimator or FD carries a bias of ``tr(sigma)/n`` that the
generator would be trained to "fix". Queue and exact populations are plain samples of n features, so
they divide by n - 1. The EMA weighs samples unequally (weight ``w_j``, ``sum w_j = 1``); the unbiased
estimator for such weights divides ``sum w_j (z_j - mu)(z_j - mu)^T`` by ``1 - V2`` with
``V2 = sum w_j^2``. It is tracked exactly (``V2 <- beta^2 V2 + (1 - beta)^2 / B``): after a warm start
with N samples it is 1/N, so a fresh EMA equals ``numpy.cov`` of the warm-start samples, and with
``beta = 0`` it equals ``numpy.cov`` of the batch. All three form their covariance with
:func:`fd_onestep.moments.covariance_from_moments` (total weight n and ``n - 1``, or 1 and ``1 - V2``).

Training-step protocol (``two_pass``, ``begin_step``, ``accumulate``, ``end_accumulation``,
``distance``, ``end_step``): see :class:`Population`; only the exact population needs the first pass.
A population advances once per optimizer step, however many micro-batches the step has (gradient
accumulation): every micro-batch of a step sees the population of the start of the step plus its own
batch, and :meth:`~Population.end_step` advances it with all of them.

Distributed (``torch.distributed`` initialized, world size W > 1): the batch moments are summed over
processes, so the population is the global batch. The local part keeps its gradient, scaled by W
(see :func:`fd_onestep.distributed.sum_over_processes_with_local_grad`), so after DDP's averaging the
parameter gradient equals the one-process gradient with the global batch. Every process must call the
population the same number of times (it runs a collective).

State: every population is a ``torch.nn.Module`` whose state lives in float64/int64 buffers, so
``state_dict()`` holds tensors only (``torch.save``/``torch.load(weights_only=True)``/Accelerate's
``register_for_checkpointing`` work) and ``.to(device)`` moves it.

Device: build a population on the process's device (``build_population(..., device=accelerator.device)``):
its buffers are created there, and so is every tensor it hands to a collective (NCCL takes CUDA tensors
only). Features on another device move the population to theirs before anything is computed, in every
call that takes features (``forward``, ``accumulate``, ``warm_start``), so its collectives always run
where its features are.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Iterable

import torch

from fd_onestep.distributed import (
    all_gather_cat,
    all_reduce_sum,
    get_rank,
    get_world_size,
    sum_over_processes_with_local_grad,
    with_local_grad,
)
from fd_onestep.moments import FeatureMoments, check_features, covariance_from_moments, raw_sums

if TYPE_CHECKING:  # pragma: no cover
    from fd_onestep.reference_stats import ReferenceStats

__all__ = [
    "Population",
    "EMAPopulation",
    "QueuePopulation",
    "ExactPopulation",
    "PASS2_RTOL",
    "build_population",
    "pass2_tolerance",
]


def _batch_sums(features: torch.Tensor, dim: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Global (over processes) ``(n, sum z, sum z z^T)`` of a batch; gradient flows to the local part.

    The two sums are float64 and differentiable w.r.t. ``features``; with W processes the local part's
    gradient is scaled by W (DDP averages it back).
    """
    check_features(features, dim)
    z = features.to(torch.float64)
    s1, s2 = raw_sums(z)
    if get_world_size() == 1:
        return int(z.shape[0]), s1, s2
    count = torch.tensor([float(z.shape[0])], dtype=torch.float64, device=z.device)
    packed = sum_over_processes_with_local_grad(torch.cat([count, s1, s2.reshape(-1)]))
    n = int(round(float(packed[0].detach())))
    return n, packed[1 : 1 + dim], packed[1 + dim :].reshape(dim, dim)


def _sample_statistics(sum1: torch.Tensor, sum2: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu (d,), sigma (d, d))`` float64 of n equally weighted samples from their raw sums.

    ``sigma = (sum2 - n mu mu^T) / (n - 1)`` (``numpy.cov``), see :func:`covariance_from_moments`.
    """
    mu = sum1 / n
    return mu, covariance_from_moments(mu, sum2, n, n - 1)


class Population(torch.nn.Module, abc.ABC):
    """Base class: ``population(features (B, d)) -> (mu (d,), sigma (d, d))`` float64, grad via features.

    Subclasses document whether/when calling advances their state.

    Step protocol (what a training loop calls, the same for every estimator; :class:`FDLoss
    <fd_onestep.losses.FDLoss>` and :class:`MultiEncoderFDLoss <fd_onestep.losses.MultiEncoderFDLoss>`
    forward it), for an optimizer step of k >= 1 micro-batches:

    1. :meth:`begin_step`;
    2. only when :attr:`two_pass`: **pass 1**, :meth:`accumulate` with the (no-grad) features of every
       micro-batch of the step, then :meth:`end_accumulation` (a collective under torch.distributed);
    3. **pass 2**: per micro-batch, ``mu, sigma = population(features)`` with gradient, then the loss
       ``population.distance(reference, mu, sigma)``, then backward;
    4. :meth:`end_step` (before or after ``optimizer.step()``).

    Between :meth:`begin_step` and :meth:`end_step` a call with ``update=True`` does not advance the
    population: each micro-batch's statistics are those of the population of the start of the step
    plus its own batch (the only part with gradient), and :meth:`end_step` advances the population
    once, as one call with all the step's micro-batches concatenated would (EMA: one update with the
    union batch; queue: all of them pushed). So the population's memory counts optimizer steps, not
    micro-batches, whatever the gradient accumulation. Outside a step (no :meth:`begin_step`) every
    call with ``update=True`` advances the population at once (one call per optimizer step).

    For one-pass estimators (EMA, queue: ``two_pass = False``) step 2 is a no-op. The exact population
    checks at :meth:`end_step` that pass 2 saw the features of pass 1. The FD itself goes through
    :meth:`distance` so that an estimator whose statistics are the same for every micro-batch of a step
    (the exact population) can compute it once per step.

    Args:
        dim: feature dimension d.
        device: where the buffers are created: the process's device (``accelerator.device``) under
            torch.distributed (module docstring); None is torch's default device.
    """

    #: whether :meth:`warm_start` is meaningful for this estimator
    supports_warm_start: bool = True
    #: whether a training step needs pass 1 (:meth:`accumulate` of every micro-batch) before pass 2
    two_pass: bool = False

    def __init__(self, dim: int, *, device: torch.device | str | None = None):
        super().__init__()
        if int(dim) <= 0:
            raise ValueError(f"dim must be a positive feature dimension, got {dim}.")
        self.dim = int(dim)
        self._in_step = False

    def _follow(self, features: torch.Tensor) -> None:
        buf = next(self.buffers(), None)
        if buf is not None and buf.device != features.device:
            self.to(features.device)

    @abc.abstractmethod
    def forward(self, features: torch.Tensor, *, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    @abc.abstractmethod
    def warm_start(self, chunks: Iterable[torch.Tensor]) -> None:
        ...

    @property
    def in_step(self) -> bool:
        """Whether a step is open (:meth:`begin_step` called, :meth:`end_step` not yet)."""
        return self._in_step

    def begin_step(self) -> None:
        """Start an optimizer step; a step still open is ended first (:meth:`end_step`)."""
        if self._in_step:
            self.end_step()
        self._in_step = True

    def end_step(self) -> None:
        """End the optimizer step: advance the population once with the step's micro-batches.

        No-op when no step is open. Collective under torch.distributed for the exact population only
        (the one-pass populations reduced each micro-batch already).
        """
        if self._in_step:
            self._in_step = False
            self._advance_step()

    def _advance_step(self) -> None:
        """Apply the updates recorded since :meth:`begin_step` (subclasses)."""

    def accumulate(self, features: torch.Tensor) -> None:
        """Pass 1: add one micro-batch's features (no-op for one-pass estimators)."""

    def end_accumulation(self) -> None:
        """End pass 1 (no-op for one-pass estimators)."""

    def distance(self, reference: "ReferenceStats", mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """FD-loss of statistics returned by this population: ``reference.frechet_distance(mu, sigma)``.

        Args:
            reference: the reference statistics.
            mu, sigma: (d,), (d, d) float64 from :meth:`forward` (may carry gradient).

        Returns:
            0-dim float64 tensor, differentiable w.r.t. ``mu`` and ``sigma``.
        """
        return reference.frechet_distance(mu, sigma)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class EMAPopulation(Population):
    """Exponential moving average of the raw moments (mean, E[zz^T]).

    Each update advances the EMA by one step with a batch of n samples::

        mu_t = beta * sg(mu_{t-1}) + (1 - beta) * batch_mean          (same for E[zz^T])
        sigma_t = (E_t - mu_t mu_t^T) / (1 - V2_t)                    (see the module docstring)

    A call returns the statistics after one step with its batch (gradient through the batch). With
    ``update=True`` (the default) outside a step it advances the state at once; inside a step
    (:meth:`~Population.begin_step` ... :meth:`~Population.end_step`, e.g. gradient accumulation over k
    micro-batches) every micro-batch is one step from the state of the start of the step, and
    ``end_step`` advances the state once with the union of the step's micro-batches (n = their total
    count), so ``num_updates`` counts optimizer steps. ``update=False``: a side evaluation, nothing is
    recorded. Warm-start it with :meth:`warm_start` from many generated samples; without a warm start
    the first batch initializes the EMA (with all the gradient on that batch).

    Args:
        dim: feature dimension d.
        beta: EMA decay in [0, 1); 0.999 keeps ~1000 batches.
        device: where the buffers are created (the process's device).

    State (``state_dict``): ``mean`` (d,), ``second_moment`` (d, d), ``sum_sq_weights`` (V2, 0-dim),
    all float64; ``num_updates`` (0-dim int64; 0 means empty).
    """

    def __init__(self, dim: int, beta: float = 0.999, *, device: torch.device | str | None = None):
        super().__init__(dim, device=device)
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}; typical values are 0.99-0.9999.")
        self.beta = float(beta)
        self.register_buffer("mean", torch.zeros(self.dim, dtype=torch.float64, device=device))
        self.register_buffer("second_moment", torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device))
        self.register_buffer("sum_sq_weights", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64, device=device))
        # [n, sum z, sum z z^T] (global, detached) of the micro-batches of the open step
        self._pending: list | None = None

    @property
    def is_empty(self) -> bool:
        return int(self.num_updates) == 0

    def _stepped(self, n: int, s1: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(mu (d,), E[zz^T] (d, d), V2)`` after one EMA step from the state with a batch of ``n``
        samples whose raw sums are ``s1``, ``s2`` (float64; differentiable w.r.t. them)."""
        bm, be = s1 / n, s2 / n
        if self.is_empty:
            if n < 2:
                raise ValueError(
                    "an EMA population without warm start needs a first batch of at least 2 samples; "
                    "call warm_start(...) first or use a larger batch."
                )
            return bm, be, 1.0 / n
        b = self.beta
        mu = b * self.mean + (1.0 - b) * bm
        second = b * self.second_moment + (1.0 - b) * be
        return mu, second, b * b * float(self.sum_sq_weights) + (1.0 - b) ** 2 / n

    @torch.no_grad()
    def _set_state(self, mu: torch.Tensor, second: torch.Tensor, v2: float) -> None:
        self.mean.copy_(mu.detach())
        self.second_moment.copy_(second.detach())
        self.sum_sq_weights.fill_(v2)
        self.num_updates += 1

    def forward(self, features: torch.Tensor, *, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Statistics after one EMA step with this batch; advance the state (or record the batch for
        :meth:`~Population.end_step` inside a step) when ``update``."""
        self._follow(features)
        n, s1, s2 = _batch_sums(features, self.dim)
        mu, second, v2 = self._stepped(n, s1, s2)
        # normalized weights (total 1): reliability-weight normalization 1 - V2 (module docstring)
        sigma = covariance_from_moments(mu, second, 1.0, 1.0 - v2)
        if update and self.in_step:
            if self._pending is None:
                self._pending = [n, s1.detach().clone(), s2.detach().clone()]
            else:
                self._pending[0] += n
                self._pending[1] += s1.detach()
                self._pending[2] += s2.detach()
        elif update:
            self._set_state(mu, second, v2)
        return mu, sigma

    def begin_step(self) -> None:
        super().begin_step()
        self._pending = None

    def _advance_step(self) -> None:
        """One EMA step with the union of the step's micro-batches."""
        if self._pending is not None:
            n, s1, s2 = self._pending
            self._pending = None
            self._set_state(*self._stepped(n, s1, s2))

    @torch.no_grad()
    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current (mu, sigma) of the EMA, no gradient (for logging / evaluation)."""
        if self.is_empty:
            raise RuntimeError("the EMA population is empty; warm_start(...) it or call it on a batch first.")
        sigma = covariance_from_moments(self.mean, self.second_moment, 1.0, 1.0 - float(self.sum_sq_weights))
        return self.mean.clone(), sigma

    @torch.no_grad()
    def warm_start(self, chunks: Iterable[torch.Tensor]) -> FeatureMoments:
        """Set the EMA to the exact moments of all features in ``chunks`` (streamed, float64).

        The moments are accumulated on the device of the features (the population moves there first,
        as in :meth:`forward`). Under torch.distributed they are summed over processes (collective,
        on that device). Returns the (global) :class:`FeatureMoments`.
        """
        moments = FeatureMoments(self.dim, device=self.mean.device)
        for chunk in chunks:
            check_features(chunk, self.dim, "warm-start features")
            if moments.count == 0:
                self._follow(chunk)
                moments.to(self.mean.device)
            moments.update(chunk)
        moments.all_reduce()
        if moments.count < 2:
            raise ValueError(f"warm_start needs at least 2 features, got {moments.count}; pass more chunks.")
        self.mean.copy_(moments.mean)
        self.second_moment.copy_(moments.second_moment)
        self.sum_sq_weights.fill_(1.0 / moments.count)
        self.num_updates.fill_(1)
        return moments

    def extra_repr(self) -> str:
        return f"dim={self.dim}, beta={self.beta}"


class QueuePopulation(Population):
    """The current batch plus a FIFO queue of the last ``queue_size`` stored samples (stop-gradient).

    Each call returns the statistics of ``[current global batch] + [queue]`` (``n = B + filled``
    samples, covariance ``/(n - 1)``) and, with ``update=True``, then pushes the (detached) global
    batch into the queue, evicting the oldest samples; inside a step (:meth:`~Population.begin_step`
    ... :meth:`~Population.end_step`) the batches are kept and ``end_step`` pushes all of the step's
    micro-batches at once (every micro-batch of the step sees the queue of the start of the step).
    Under torch.distributed the queue stores the all-gathered global batch in rank order, so every
    process holds the same queue.

    Args:
        dim: feature dimension d.
        queue_size: number of samples (not batches) kept; e.g. 100 batches of 256 -> 25600.
        storage_dtype: dtype of the stored features; float32 is lossless for float32 encoder
            features and halves memory (queue_size * d * 4 bytes). Running sums are float64.
        device: where the buffers are created (the process's device).

    State: ``features`` (queue_size, d), ``ptr``/``filled`` (0-dim int64), ``sum`` (d,) and
    ``sum_outer`` (d, d) float64 running sums of the stored samples (recomputed exactly each time the
    ring buffer wraps around, so round-off cannot drift).
    """

    def __init__(self, dim: int, queue_size: int, *, storage_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__(dim, device=device)
        if int(queue_size) < 1:
            raise ValueError(f"queue_size must be >= 1 sample, got {queue_size}.")
        self.queue_size = int(queue_size)
        self.register_buffer("features", torch.zeros(self.queue_size, self.dim, dtype=storage_dtype, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("sum", torch.zeros(self.dim, dtype=torch.float64, device=device))
        self.register_buffer("sum_outer", torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device))
        # the gathered (detached) global batches of the open step, pushed by end_step
        self._pending: list[torch.Tensor] = []

    def forward(self, features: torch.Tensor, *, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Statistics of current batch + queue; push the batch afterwards (or at :meth:`~Population.end_step`
        inside a step) when ``update``."""
        self._follow(features)
        n_b, s1, s2 = _batch_sums(features, self.dim)
        n = n_b + int(self.filled)
        if n < 2:
            raise ValueError("a queue population needs at least 2 samples in batch + queue; use a larger batch.")
        mu, sigma = _sample_statistics(self.sum + s1, self.sum_outer + s2, n)
        if update:
            batch = all_gather_cat(features)
            if self.in_step:
                self._pending.append(batch)
            else:
                self.push(batch)
        return mu, sigma

    def begin_step(self) -> None:
        super().begin_step()
        self._pending = []

    def _advance_step(self) -> None:
        """Push the step's micro-batches, in order, as one batch."""
        pending, self._pending = self._pending, []
        if pending:
            self.push(torch.cat(pending))

    @torch.no_grad()
    def push(self, features: torch.Tensor) -> None:
        """Append (B, d) features to the queue (no collective: pass the global batch yourself)."""
        check_features(features, self.dim)
        rows = features.detach().to(device=self.features.device, dtype=self.features.dtype)[-self.queue_size :]
        m = rows.shape[0]
        q, ptr, filled = self.queue_size, int(self.ptr), int(self.filled)
        idx = (ptr + torch.arange(m, device=rows.device)) % q
        evicted = self.features[idx[idx < filled]].to(torch.float64)
        if evicted.shape[0]:
            e1, e2 = raw_sums(evicted)
            self.sum -= e1
            self.sum_outer -= e2
        self.features[idx] = rows
        r1, r2 = raw_sums(rows.to(torch.float64))
        self.sum += r1
        self.sum_outer += r2
        self.filled.fill_(min(filled + m, q))
        self.ptr.fill_((ptr + m) % q)
        if ptr + m >= q:  # wrapped around: refresh the running sums exactly
            self._recompute_sums()

    @torch.no_grad()
    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of the stored samples only, no gradient."""
        n = int(self.filled)
        if n < 2:
            raise RuntimeError(f"the queue holds {n} sample(s); push or warm_start at least 2 first.")
        return _sample_statistics(self.sum.clone(), self.sum_outer.clone(), n)

    @torch.no_grad()
    def _recompute_sums(self) -> None:
        s1, s2 = raw_sums(self.features[: int(self.filled)].to(torch.float64))
        self.sum.copy_(s1)
        self.sum_outer.copy_(s2)

    @torch.no_grad()
    def warm_start(self, chunks: Iterable[torch.Tensor]) -> None:
        """Fill the queue with the last ``queue_size`` features of ``chunks`` (streamed).

        Under torch.distributed each chunk is all-gathered (collective: same number of chunks on
        every process).
        """
        for chunk in chunks:
            self._follow(chunk)
            check_features(chunk, self.dim, "warm-start features")
            self.push(all_gather_cat(chunk))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, queue_size={self.queue_size}"


# ExactPopulation's check of pass 2 against pass 1 off the CPU: the largest normalized deviation
# accepted, by the dtype of the features (see ExactPopulation, "Self-check").
PASS2_RTOL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 6e-2}


def pass2_tolerance(device: torch.device, dtype: torch.dtype) -> float:
    """Default tolerance of :class:`ExactPopulation`'s pass-2 check: 0 (bitwise) on the CPU, else
    :data:`PASS2_RTOL` of the features' dtype (float32's for other dtypes)."""
    if torch.device(device).type == "cpu":
        return 0.0
    return PASS2_RTOL.get(dtype, PASS2_RTOL[torch.float32])


def _normalized_deviation(n: int, sums_a: tuple[torch.Tensor, torch.Tensor],
                          sums_b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """``max(|s1_a - s1_b|_i / sqrt(n D_i), |S2_a - S2_b|_ij / sqrt(D_i D_j))`` with ``D = diag(S2_a)``.

    ``sums_*``: ``(sum z (d,), sum z z^T (d, d))`` float64 of n samples. The denominators bound the
    entries (Cauchy-Schwarz: ``|s1_i| <= sqrt(n D_i)``, ``|S2_ij| <= sqrt(D_i D_j)``): features changed
    by a relative ``eps`` between the two sets of n samples give about ``2 eps`` (through ``z z^T``).
    """
    root = sums_a[1].diagonal().clamp(min=torch.finfo(torch.float64).tiny).sqrt()
    dev1 = ((sums_a[0] - sums_b[0]).abs() / (root * max(n, 1) ** 0.5)).max()
    dev2 = ((sums_a[1] - sums_b[1]).abs() / torch.outer(root, root)).max()
    return float(torch.maximum(dev1, dev2))


class ExactPopulation(Population):
    """Exact large-batch FD gradient over k micro-batches, holding one micro-batch's activations at a time.

    The population is the whole large batch (all micro-batches of all processes). Two passes:

    1. **Pass 1** (no grad): the features of every micro-batch -> total moments M (count, sum,
       sum zz^T), summed over processes.
    2. **Pass 2** (with grad), per micro-batch i: recompute its features with the same inputs and
       call the population. It returns the statistics of ``sg(M - M_i) + M_i`` for both raw moments,
       where ``M_i`` is micro-batch i's contribution: the *value* is exactly the statistics of the
       whole large batch (so the loss is the large-batch FD), the *gradient* flows only through
       micro-batch i. Summing the k backward passes gives exactly the full-batch gradient.

    Every micro-batch of pass 2 sees the same statistics M, so :meth:`distance` computes F(M) and its
    gradient ``g = (dF/dmu, dF/dsigma)`` once per step (one eigen-decomposition) and returns
    ``F(M) + <g, M_i - sg(M_i)>`` for micro-batch i: value F(M), gradient exactly ``g . dM_i/dtheta``.

    Example (a training step; ``noise`` is split into k micro-batches; :class:`FDLoss
    <fd_onestep.losses.FDLoss>` forwards the step protocol)::

        fd_loss = FDLoss(reference, ExactPopulation(dim, micro_batches=k, device=accelerator.device))

        fd_loss.begin_step()
        with torch.no_grad(), accelerator.autocast():          # pass 1: statistics only
            for noise_i in noise.chunk(k):
                fd_loss.accumulate(encoder(generator(noise_i)))
        fd_loss.end_accumulation()                              # sum over processes (collective)
        for i, noise_i in enumerate(noise.chunk(k)):            # pass 2: one micro-batch at a time
            sync = i == k - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(generator)):
                with accelerator.autocast():                    # the same precision as pass 1
                    features = encoder(generator(noise_i))
                loss = fd_loss(features)                        # value = FD of the large batch
                accelerator.backward(loss)                      # gradients add up over i
        fd_loss.end_step()                                      # pass 2 == pass 1? (collective)
        optimizer.step(); optimizer.zero_grad()

    Sum the k backward passes as they are: do not divide the loss by k (with Accelerate, do not
    run pass 2 under ``accelerator.accumulate`` with ``gradient_accumulation_steps=k``, which would
    divide by k). Pass 2 must see the same samples as pass 1, in the same order: the same noise and
    conditioning, the same autocast / mixed precision, no dropout (or the same random masks).
    Instead of :meth:`accumulate`, pass 1 may compute :meth:`micro_batch_moments` itself and hand the
    merged total to ``begin_step(total)``.

    Self-check: every process keeps the sums of the micro-batches it saw in pass 2 (``update=True``
    calls) and :meth:`end_step` compares them with its own pass-1 sums: they must have the same
    sample count, the same feature dtype and the same sums -- bitwise on the CPU (the same features,
    summed in the same order, give the same float64 sums), and within ``pass2_rtol`` elsewhere, where
    the deviation is :func:`_normalized_deviation` (about twice the largest relative change of the
    features) and the default is :data:`PASS2_RTOL` of the features' dtype (1e-4 for float32, 6e-2
    for bfloat16, 8e-3 for float16: several hundred float32 / about 4 bfloat16 or float16 units in
    the last place, room for GPU kernels that are not bitwise deterministic, against the 1e-3..1 by
    which autocast in one pass only, dropout or other noise move features; a bfloat16 pass against a
    float32 one is caught by its dtype). Otherwise it raises ``RuntimeError`` on every
    process (the verdict is all-reduced) saying what differed. A step that :meth:`end_step` did not
    end is checked by the next :meth:`begin_step` once pass 2 has run.

    Covariance: ``/(n - 1)`` with n the total number of samples (numpy.cov).

    Args:
        dim: feature dimension d.
        micro_batches: k, if known: pass 2 then refuses a (k+1)-th micro-batch (a loop bug).
        pass2_rtol: tolerance of the self-check on every device (None: :func:`pass2_tolerance`;
            ``float("inf")`` checks only counts and dtypes).
        device: where the buffers are created (the process's device).

    State: ``total_count`` (0-dim int64), ``total_sum`` (d,), ``total_sum_outer`` (d, d) float64,
    ``reduced``/``pass2_samples``/``pass2_calls`` (0-dim int64): the current step only. (The
    self-check's sums are not state: a step resumed from a checkpoint is not checked.)
    """

    supports_warm_start = False
    two_pass = True

    def __init__(self, dim: int, micro_batches: int | None = None, *, pass2_rtol: float | None = None,
                 device: torch.device | str | None = None):
        super().__init__(dim, device=device)
        if micro_batches is not None and int(micro_batches) < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}.")
        if pass2_rtol is not None and not float(pass2_rtol) >= 0:
            raise ValueError(f"pass2_rtol must be a number >= 0 (or None for the default), got {pass2_rtol}.")
        self.micro_batches = None if micro_batches is None else int(micro_batches)
        self.pass2_rtol = None if pass2_rtol is None else float(pass2_rtol)
        # bumped whenever the totals change: distance() caches the FD gradient at M per version
        self.version = 0
        # ((id(reference), version), F(M), dF/dmu, dF/dsigma) of the last pass-2 distance; not state
        self._fd_cache = None
        self._clear_check()
        self.register_buffer("total_count", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("total_sum", torch.zeros(self.dim, dtype=torch.float64, device=device))
        self.register_buffer("total_sum_outer", torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device))
        self.register_buffer("reduced", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("pass2_samples", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("pass2_calls", torch.zeros((), dtype=torch.int64, device=device))

    def _clear_check(self) -> None:
        # this process's pass-1 (count, sum, sum_outer) once pass 1 ended (None: nothing to check),
        # its pass-2 sums so far, and the feature dtypes each pass saw
        self._pass1_local = None
        self._pass2_local = None
        self._dtypes = ([], [])

    @staticmethod
    def micro_batch_moments(features: torch.Tensor) -> FeatureMoments:
        """Float64 moments of one micro-batch's (B_i, d) features (detached), for pass 1."""
        return FeatureMoments.from_features(features.detach())

    @torch.no_grad()
    def begin_step(self, total: FeatureMoments | None = None, *, reduced: bool = False) -> None:
        """Start a step: clear the totals, or set them to ``total`` (local moments, or already summed
        over processes when ``reduced=True``).

        A step that :meth:`end_step` did not end is checked first (collective), if its pass 2 ran.
        """
        if self._pass2_local is not None:
            self._check_passes()
        self._in_step = True
        self._clear_check()
        self.version += 1
        self.total_count.zero_()
        self.total_sum.zero_()
        self.total_sum_outer.zero_()
        self.reduced.zero_()
        self.pass2_samples.zero_()
        self.pass2_calls.zero_()
        if total is not None:
            if total.dim != self.dim:
                raise ValueError(f"total moments have dimension {total.dim}, the population {self.dim}.")
            self.total_count.fill_(total.count)
            self.total_sum.copy_(total.sum)
            self.total_sum_outer.copy_(total.sum_outer)
            self.reduced.fill_(int(bool(reduced)))

    def end_step(self) -> None:
        """End the step: check that pass 2 saw exactly the features of pass 1 (class docstring).

        Collective under torch.distributed (a 2W-element all-reduce of the per-process verdicts).
        Raises ``RuntimeError`` on every process when some process's pass 2 differs from its pass 1.
        """
        self._in_step = False
        if self._pass1_local is not None:
            self._check_passes()
        self._clear_check()

    @torch.no_grad()
    def _check_passes(self) -> None:
        """Compare this process's pass-2 sums with its pass-1 sums; raise on every process if any differs."""
        n1, s1, s2 = self._pass1_local
        n2, p1, p2 = self._pass2_local if self._pass2_local is not None else (0, None, None)
        dtypes1, dtypes2 = (sorted({str(t).replace("torch.", "") for t in ts}) for ts in self._dtypes)
        rtol = self.pass2_rtol
        if rtol is None:
            rtol = pass2_tolerance(s1.device, self._dtypes[1][0] if self._dtypes[1] else torch.float32)
        self._clear_check()
        problem = None
        if n2 != n1:
            problem = (f"pass 2 saw {n2} samples but pass 1 {n1}: run pass 2 once over every pass-1 "
                       "micro-batch before end_step()")
        elif dtypes1 and dtypes1 != dtypes2:
            problem = (f"the pass-1 features are {'/'.join(dtypes1)} but the pass-2 features {'/'.join(dtypes2)}: "
                       "different autocast / mixed precision between the passes")
        elif n1 > 0 and not (torch.equal(s1, p1) and torch.equal(s2, p2)):
            deviation = _normalized_deviation(n1, (s1, s2), (p1, p2))
            if not (rtol > 0 and deviation <= rtol):
                tolerance = "bitwise equality (CPU)" if rtol == 0 else f"tolerance {rtol:.1e}"
                problem = (f"pass 2 features differ from pass 1 (largest normalized deviation of their sums "
                           f"{deviation:.3e}; {tolerance}): different autocast / mixed precision, dropout "
                           "(train-mode or LoRA dropout) or other randomness, or other noise or conditioning "
                           "between the passes")
        # every process learns every verdict, so that all of them raise (none waits in a collective)
        world, rank = get_world_size(), get_rank()
        verdicts = torch.zeros(world, dtype=torch.float64, device=s1.device)
        verdicts[rank] = float(problem is not None)
        bad = [r for r, v in enumerate(all_reduce_sum(verdicts).tolist()) if v != 0]
        if not bad:
            return
        where = f" on process {rank} of {world}" if world > 1 else ""
        if problem is None:
            problem = f"pass 2 differs from pass 1 on process(es) {bad} of {world} (see their error)"
        raise RuntimeError(
            f"ExactPopulation{where}: {problem}. Pass 2 must recompute exactly the features of pass 1: the same "
            "inputs, the same autocast context, deterministic modules (non-deterministic GPU kernels: raise "
            "pass2_rtol)."
        )

    @torch.no_grad()
    def accumulate(self, features: torch.Tensor) -> None:
        """Pass 1: add one micro-batch's (B_i, d) features (detached) to this process's totals."""
        if int(self.reduced):
            raise RuntimeError(
                "ExactPopulation.accumulate after end_accumulation/pass 2 started; call begin_step() "
                "to start the next step before accumulating its pass-1 features."
            )
        self._follow(features)
        check_features(features, self.dim)
        self.version += 1
        self._dtypes[0].append(features.dtype)
        z = features.detach().to(torch.float64)
        s1, s2 = raw_sums(z)
        self.total_count += z.shape[0]
        self.total_sum += s1
        self.total_sum_outer += s2

    @torch.no_grad()
    def end_accumulation(self) -> None:
        """End pass 1: sum the totals over processes (collective; no-op when not distributed).

        Called automatically by the first pass-2 call if you do not call it.
        """
        if int(self.reduced):
            return
        local = (int(self.total_count), self.total_sum, self.total_sum_outer)
        moments = FeatureMoments(self.dim, device=self.total_sum.device)
        moments.count, moments.sum, moments.sum_outer = local
        moments.all_reduce()
        self.version += 1
        if get_world_size() > 1:  # the buffers are about to hold the global totals
            local = (local[0], local[1].clone(), local[2].clone())
        self._pass1_local = local
        self.total_count.fill_(moments.count)
        self.total_sum.copy_(moments.sum)
        self.total_sum_outer.copy_(moments.sum_outer)
        self.reduced.fill_(1)

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of the whole large batch, no gradient (after pass 1)."""
        self.end_accumulation()
        return _sample_statistics(self.total_sum.clone(), self.total_sum_outer.clone(), self._n())

    def _n(self) -> int:
        n = int(self.total_count)
        if n < 2:
            raise RuntimeError(
                f"ExactPopulation has {n} pass-1 sample(s); run pass 1 (begin_step(); accumulate(features) "
                "for every micro-batch) before pass 2."
            )
        return n

    def forward(self, features: torch.Tensor, *, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 2 for one micro-batch: large-batch statistics whose gradient flows through ``features``.

        ``update`` (default) counts this micro-batch against ``micro_batches`` and the pass-1 sample
        count, so a loop that runs more micro-batches in pass 2 than in pass 1 fails loudly, and adds
        its sums to those :meth:`end_step` checks against pass 1.
        """
        self._follow(features)
        self.end_accumulation()
        n = self._n()
        check_features(features, self.dim)
        z = features.to(torch.float64)
        n_i, (s1_i, s2_i) = int(z.shape[0]), raw_sums(z)
        if update:
            calls, seen = int(self.pass2_calls) + 1, int(self.pass2_samples) + n_i
            if self.micro_batches is not None and calls > self.micro_batches:
                raise RuntimeError(
                    f"pass 2 got micro-batch {calls} but micro_batches={self.micro_batches}; call "
                    "begin_step() at the start of each step and run pass 2 once per micro-batch."
                )
            if seen > n:
                raise RuntimeError(
                    f"pass 2 has seen {seen} samples but pass 1 only {n}; pass 2 must use the same "
                    "micro-batches as pass 1 (call begin_step() and redo pass 1 for a new step)."
                )
            self.pass2_calls.fill_(calls)
            self.pass2_samples.fill_(seen)
            self._record_pass2(n_i, s1_i.detach(), s2_i.detach(), features.dtype)
        # value: exactly the pass-1 totals; gradient: through this micro-batch only, times the world
        # size so that DDP's averaging leaves the global-batch gradient (no collective needed here)
        sum1 = with_local_grad(self.total_sum, s1_i)
        sum2 = with_local_grad(self.total_sum_outer, s2_i)
        return _sample_statistics(sum1, sum2, n)

    def _record_pass2(self, n_i: int, s1_i: torch.Tensor, s2_i: torch.Tensor, dtype: torch.dtype) -> None:
        """Add a pass-2 micro-batch's sums, in pass order (as pass 1 added them: bitwise comparable)."""
        self._dtypes[1].append(dtype)
        if self._pass2_local is None:
            self._pass2_local = (n_i, s1_i.clone(), s2_i.clone())
        else:
            n, p1, p2 = self._pass2_local
            self._pass2_local = (n + n_i, p1.add_(s1_i), p2.add_(s2_i))

    def distance(self, reference: "ReferenceStats", mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Pass-2 FD-loss with one eigen-decomposition per step, not per micro-batch.

        ``mu``, ``sigma`` (from :meth:`forward`) have the value of the whole large batch M for every
        micro-batch; F(M) and its gradient (g_mu, g_sigma) are computed at the first micro-batch of
        the step (cached per reference and :attr:`version`) and each call returns
        ``F(M) + <g_mu, mu - sg(mu)> + <g_sigma, sigma - sg(sigma)>``: value F(M), gradient exactly
        ``g . dM_i`` (what autograd through the full FD would give). Statistics without gradient get
        the plain :meth:`Population.distance`.
        """
        if not (mu.requires_grad or sigma.requires_grad):
            return super().distance(reference, mu, sigma)
        key = (id(reference), self.version)
        if self._fd_cache is None or self._fd_cache[0] != key:
            mu0 = mu.detach().requires_grad_()
            sigma0 = sigma.detach().requires_grad_()
            with torch.enable_grad():
                value = reference.frechet_distance(mu0, sigma0)
                g_mu, g_sigma = torch.autograd.grad(value, (mu0, sigma0))
            self._fd_cache = (key, value.detach(), g_mu, g_sigma)
        _, value, g_mu, g_sigma = self._fd_cache
        return value + (g_mu * (mu - mu.detach())).sum() + (g_sigma * (sigma - sigma.detach())).sum()

    def _load_from_state_dict(self, *args, **kwargs):
        self.version += 1
        self._clear_check()
        return super()._load_from_state_dict(*args, **kwargs)

    def warm_start(self, chunks: Iterable[torch.Tensor]) -> None:
        raise ValueError(
            "ExactPopulation has no state across steps (its population is the current large batch), so it "
            "cannot be warm-started; skip warm_start for kind='exact' (check population.supports_warm_start)."
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, micro_batches={self.micro_batches}"


def build_population(kind: str, dim: int, *, device: torch.device | str | None = None, **kwargs) -> Population:
    """Build a population by name.

    Args:
        kind: ``"ema"`` (kwargs: ``beta``), ``"queue"`` (``queue_size``, ``storage_dtype``) or
            ``"exact"`` (``micro_batches``, ``pass2_rtol``).
        dim: feature dimension d.
        device: where its buffers are created: the process's device (``accelerator.device``), where
            its collectives then run (module docstring).
    """
    kinds = {"ema": EMAPopulation, "queue": QueuePopulation, "exact": ExactPopulation}
    cls = kinds.get(str(kind).lower())
    if cls is None:
        raise ValueError(f"unknown population kind {kind!r}; choose one of {sorted(kinds)}.")
    try:
        return cls(dim, device=device, **kwargs)
    except TypeError as err:
        raise TypeError(f"bad arguments for population {kind!r}: {err}; see help({cls.__name__}).") from err
