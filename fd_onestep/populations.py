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
``distance``): see :class:`Population`; only the exact population needs the first pass.

Distributed (``torch.distributed`` initialized, world size W > 1): the batch moments are summed over
processes, so the population is the global batch. The local part keeps its gradient, scaled by W
(see :func:`fd_onestep.distributed.sum_over_processes_with_local_grad`), so after DDP's averaging the
parameter gradient equals the one-process gradient with the global batch. Every process must call the
population the same number of times (it runs a collective).

State: every population is a ``torch.nn.Module`` whose state lives in float64/int64 buffers, so
``state_dict()`` holds tensors only (``torch.save``/``torch.load(weights_only=True)``/Accelerate's
``register_for_checkpointing`` work) and ``.to(device)`` moves it. A population moves itself to the
device of the features on the first call.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Iterable

import torch

from fd_onestep.distributed import all_gather_cat, get_world_size, sum_over_processes_with_local_grad, with_local_grad
from fd_onestep.moments import FeatureMoments, check_features, covariance_from_moments, raw_sums

if TYPE_CHECKING:  # pragma: no cover
    from fd_onestep.reference_stats import ReferenceStats

__all__ = ["Population", "EMAPopulation", "QueuePopulation", "ExactPopulation", "build_population"]


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
    forward it):

    1. :meth:`begin_step` at the start of every optimizer step;
    2. only when :attr:`two_pass`: **pass 1**, :meth:`accumulate` with the (no-grad) features of every
       micro-batch of the step, then :meth:`end_accumulation` (a collective under torch.distributed);
    3. **pass 2**: per micro-batch, ``mu, sigma = population(features)`` with gradient, then the loss
       ``population.distance(reference, mu, sigma)``, then backward.

    For one-pass estimators (EMA, queue: ``two_pass = False``) steps 1-2 are no-ops and a step is one
    call per batch. The FD itself goes through :meth:`distance` so that an estimator whose statistics
    are the same for every micro-batch of a step (the exact population) can compute it once per step.
    """

    #: whether :meth:`warm_start` is meaningful for this estimator
    supports_warm_start: bool = True
    #: whether a training step needs pass 1 (:meth:`accumulate` of every micro-batch) before pass 2
    two_pass: bool = False

    def __init__(self, dim: int):
        super().__init__()
        if int(dim) <= 0:
            raise ValueError(f"dim must be a positive feature dimension, got {dim}.")
        self.dim = int(dim)

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

    def begin_step(self) -> None:
        """Start an optimizer step (no-op for one-pass estimators)."""

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

    Each call with ``update=True`` (the default) advances the EMA by one step and returns the new
    statistics::

        mu_t = beta * sg(mu_{t-1}) + (1 - beta) * batch_mean          (same for E[zz^T])
        sigma_t = (E_t - mu_t mu_t^T) / (1 - V2_t)                    (see the module docstring)

    Call it once per optimizer step (or with ``update=False`` for a side evaluation). Warm-start it
    with :meth:`warm_start` from many generated samples; without a warm start the first batch
    initializes the EMA (with all the gradient on that batch).

    Args:
        dim: feature dimension d.
        beta: EMA decay in [0, 1); 0.999 keeps ~1000 batches.

    State (``state_dict``): ``mean`` (d,), ``second_moment`` (d, d), ``sum_sq_weights`` (V2, 0-dim),
    all float64; ``num_updates`` (0-dim int64; 0 means empty).
    """

    def __init__(self, dim: int, beta: float = 0.999):
        super().__init__(dim)
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}; typical values are 0.99-0.9999.")
        self.beta = float(beta)
        self.register_buffer("mean", torch.zeros(self.dim, dtype=torch.float64))
        self.register_buffer("second_moment", torch.zeros(self.dim, self.dim, dtype=torch.float64))
        self.register_buffer("sum_sq_weights", torch.zeros((), dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    @property
    def is_empty(self) -> bool:
        return int(self.num_updates) == 0

    def forward(self, features: torch.Tensor, *, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Statistics after one EMA step with this batch; advance the state when ``update``."""
        self._follow(features)
        n, s1, s2 = _batch_sums(features, self.dim)
        bm, be = s1 / n, s2 / n
        if self.is_empty:
            if n < 2:
                raise ValueError(
                    "an EMA population without warm start needs a first batch of at least 2 samples; "
                    "call warm_start(...) first or use a larger batch."
                )
            mu, second, v2 = bm, be, 1.0 / n
        else:
            b = self.beta
            mu = b * self.mean + (1.0 - b) * bm
            second = b * self.second_moment + (1.0 - b) * be
            v2 = b * b * float(self.sum_sq_weights) + (1.0 - b) ** 2 / n
        # normalized weights (total 1): reliability-weight normalization 1 - V2 (module docstring)
        sigma = covariance_from_moments(mu, second, 1.0, 1.0 - v2)
        if update:
            with torch.no_grad():
                self.mean.copy_(mu.detach())
                self.second_moment.copy_(second.detach())
                self.sum_sq_weights.fill_(v2)
                self.num_updates += 1
        return mu, sigma

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

        Under torch.distributed the moments are summed over processes (collective). Returns the
        (global) :class:`FeatureMoments`.
        """
        moments = _stream_moments(chunks, self.dim, self.mean.device)
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
    batch into the queue, evicting the oldest samples. Under torch.distributed the queue stores the
    all-gathered global batch in rank order, so every process holds the same queue.

    Args:
        dim: feature dimension d.
        queue_size: number of samples (not batches) kept; e.g. 100 batches of 256 -> 25600.
        storage_dtype: dtype of the stored features; float32 is lossless for float32 encoder
            features and halves memory (queue_size * d * 4 bytes). Running sums are float64.

    State: ``features`` (queue_size, d), ``ptr``/``filled`` (0-dim int64), ``sum`` (d,) and
    ``sum_outer`` (d, d) float64 running sums of the stored samples (recomputed exactly each time the
    ring buffer wraps around, so round-off cannot drift).
    """

    def __init__(self, dim: int, queue_size: int, *, storage_dtype: torch.dtype = torch.float32):
        super().__init__(dim)
        if int(queue_size) < 1:
            raise ValueError(f"queue_size must be >= 1 sample, got {queue_size}.")
        self.queue_size = int(queue_size)
        self.register_buffer("features", torch.zeros(self.queue_size, self.dim, dtype=storage_dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))
        self.register_buffer("sum", torch.zeros(self.dim, dtype=torch.float64))
        self.register_buffer("sum_outer", torch.zeros(self.dim, self.dim, dtype=torch.float64))

    def forward(self, features: torch.Tensor, *, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Statistics of current batch + queue; push the batch afterwards when ``update``."""
        self._follow(features)
        n_b, s1, s2 = _batch_sums(features, self.dim)
        n = n_b + int(self.filled)
        if n < 2:
            raise ValueError("a queue population needs at least 2 samples in batch + queue; use a larger batch.")
        mu, sigma = _sample_statistics(self.sum + s1, self.sum_outer + s2, n)
        if update:
            self.push(all_gather_cat(features))
        return mu, sigma

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
    <fd_onestep.losses.FDLoss>` forwards ``begin_step``/``accumulate``/``end_accumulation``)::

        fd_loss = FDLoss(reference, ExactPopulation(dim, micro_batches=k))

        fd_loss.begin_step()
        with torch.no_grad():                                   # pass 1: statistics only
            for noise_i in noise.chunk(k):
                fd_loss.accumulate(encoder(generator(noise_i)))
        fd_loss.end_accumulation()                              # sum over processes (collective)
        for i, noise_i in enumerate(noise.chunk(k)):            # pass 2: one micro-batch at a time
            sync = i == k - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(generator)):
                loss = fd_loss(encoder(generator(noise_i)))     # value = FD of the large batch
                accelerator.backward(loss)                      # gradients add up over i
        optimizer.step(); optimizer.zero_grad()

    Sum the k backward passes as they are: do not divide the loss by k (with Accelerate, do not
    run pass 2 under ``accelerator.accumulate`` with ``gradient_accumulation_steps=k``, which would
    divide by k). Pass 2 must see the same samples as pass 1 (same noise; deterministic encoder, or
    at least the same inputs). Instead of :meth:`accumulate`, pass 1 may compute
    :meth:`micro_batch_moments` itself and hand the merged total to ``begin_step(total)``.

    Covariance: ``/(n - 1)`` with n the total number of samples (numpy.cov).

    Args:
        dim: feature dimension d.
        micro_batches: k, if known: pass 2 then refuses a (k+1)-th micro-batch (a loop bug).

    State: ``total_count`` (0-dim int64), ``total_sum`` (d,), ``total_sum_outer`` (d, d) float64,
    ``reduced``/``pass2_samples``/``pass2_calls`` (0-dim int64): the current step only.
    """

    supports_warm_start = False
    two_pass = True

    def __init__(self, dim: int, micro_batches: int | None = None):
        super().__init__(dim)
        if micro_batches is not None and int(micro_batches) < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}.")
        self.micro_batches = None if micro_batches is None else int(micro_batches)
        # bumped whenever the totals change: distance() caches the FD gradient at M per version
        self.version = 0
        # ((id(reference), version), F(M), dF/dmu, dF/dsigma) of the last pass-2 distance; not state
        self._fd_cache = None
        self.register_buffer("total_count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("total_sum", torch.zeros(self.dim, dtype=torch.float64))
        self.register_buffer("total_sum_outer", torch.zeros(self.dim, self.dim, dtype=torch.float64))
        self.register_buffer("reduced", torch.zeros((), dtype=torch.int64))
        self.register_buffer("pass2_samples", torch.zeros((), dtype=torch.int64))
        self.register_buffer("pass2_calls", torch.zeros((), dtype=torch.int64))

    @staticmethod
    def micro_batch_moments(features: torch.Tensor) -> FeatureMoments:
        """Float64 moments of one micro-batch's (B_i, d) features (detached), for pass 1."""
        return FeatureMoments.from_features(features.detach())

    @torch.no_grad()
    def begin_step(self, total: FeatureMoments | None = None, *, reduced: bool = False) -> None:
        """Start a step: clear the totals, or set them to ``total`` (local moments, or already summed
        over processes when ``reduced=True``)."""
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
        moments = FeatureMoments(self.dim, device=self.total_sum.device)
        moments.count, moments.sum, moments.sum_outer = int(self.total_count), self.total_sum, self.total_sum_outer
        moments.all_reduce()
        self.version += 1
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
        count, so a loop that runs more micro-batches in pass 2 than in pass 1 fails loudly.
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
        # value: exactly the pass-1 totals; gradient: through this micro-batch only, times the world
        # size so that DDP's averaging leaves the global-batch gradient (no collective needed here)
        sum1 = with_local_grad(self.total_sum, s1_i)
        sum2 = with_local_grad(self.total_sum_outer, s2_i)
        return _sample_statistics(sum1, sum2, n)

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
        return super()._load_from_state_dict(*args, **kwargs)

    def warm_start(self, chunks: Iterable[torch.Tensor]) -> None:
        raise ValueError(
            "ExactPopulation has no state across steps (its population is the current large batch), so it "
            "cannot be warm-started; skip warm_start for kind='exact' (check population.supports_warm_start)."
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, micro_batches={self.micro_batches}"


def _stream_moments(chunks: Iterable[torch.Tensor], dim: int, device) -> FeatureMoments:
    moments = FeatureMoments(dim, device=device)
    for chunk in chunks:
        check_features(chunk, dim, "warm-start features")
        moments.update(chunk)
    return moments.all_reduce()


def build_population(kind: str, dim: int, **kwargs) -> Population:
    """Build a population by name.

    Args:
        kind: ``"ema"`` (kwargs: ``beta``), ``"queue"`` (``queue_size``, ``storage_dtype``) or
            ``"exact"`` (``micro_batches``).
        dim: feature dimension d.
    """
    kinds = {"ema": EMAPopulation, "queue": QueuePopulation, "exact": ExactPopulation}
    cls = kinds.get(str(kind).lower())
    if cls is None:
        raise ValueError(f"unknown population kind {kind!r}; choose one of {sorted(kinds)}.")
    try:
        return cls(dim, **kwargs)
    except TypeError as err:
        raise TypeError(f"bad arguments for population {kind!r}: {err}; see help({cls.__name__}).") from err
