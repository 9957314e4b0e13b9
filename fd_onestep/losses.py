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

A training step follows the populations' step protocol (:class:`~fd_onestep.populations.Population`),
which both losses forward without knowing the estimator; k micro-batches are the exact population's
(``two_pass``) or gradient accumulation's::

    micro_batches = draw(k)                        # inputs (noise, conditioning) of one optimizer step
    fd_loss.begin_step()
    if fd_loss.two_pass:                           # exact population: pass 1, statistics only
        with torch.no_grad(), autocast():
            for inputs in micro_batches:
                fd_loss.accumulate(features_of(inputs))
    fd_loss.end_accumulation()                     # collective for exact populations, else no-op
    for inputs in micro_batches:                   # pass 2, the same inputs, with gradient
        with autocast():                           # the same precision as pass 1
            features = features_of(inputs)
        loss, raw = fd_loss(features)              # MultiEncoderFDLoss; FDLoss returns the FD
        loss.backward()                            # exact: not divided by k (the k gradients add up);
                                                   # accumulation: divided by k (accelerator.backward)
    fd_loss.end_step()                             # EMA/queue advance once; exact checks pass 2 (collective)
    optimizer.step()

Joint FD-loss (class-conditional generators): ``FDLoss(joint_reference, population, label_embedding=)``
matches the distribution of ``[features, alpha * one_hot(label)]`` instead of the features' marginal; every
call then takes the batch's requested ``labels`` too. The label block is a constant of the generator, so the
gradient flows through the feature block only, while the joint covariance's off-diagonal block (how features
co-vary with their label) is matched as well: a generator that ignores its label gets a large FD. The
population, of dimension d + C, can be any kind (EMA, queue, exact) and under several processes is reduced
like the marginal one.

Inside the step every micro-batch of an EMA or queue population sees the population of the start of
the step plus its own batch, and ``end_step`` advances it once with all of them. Under DDP run all but
the last micro-batch under ``no_sync`` (see :class:`~fd_onestep.populations.ExactPopulation`).
"""

from __future__ import annotations

import itertools
import math

import torch

from fd_onestep.conditioning_metrics import LabelEmbedding
from fd_onestep.moments import check_features
from fd_onestep.populations import Population
from fd_onestep.reference_stats import ReferenceStats

__all__ = ["FDLoss", "MultiEncoderFDLoss"]


class FDLoss(torch.nn.Module):
    """FD-loss for one encoder: ``features (B, d) -> FD(reference, population(features))``.

    Args:
        reference: reference statistics (its ``A = sigma^1/2`` is cached and reused every step).
        population: how the batch becomes population statistics (EMA / queue / exact); it is a
            submodule, so its state is part of this module's ``state_dict()``.

        label_embedding: joint FD-loss (module docstring): the population and the reference are of the
            joint vectors ``label_embedding(features, labels)`` (dim d + C); every call then needs the
            batch's (B,) int64 ``labels``. None (default): the marginal FD of the features.

    ``forward`` returns a 0-dim float64 tensor: the FD value (squared feature units), differentiable
    w.r.t. ``features`` through the closed-form FD backward. ``last_fd`` keeps the last value as a float.
    Calling it advances the population (see each population's docstring; inside a step, at
    :meth:`end_step`). :attr:`two_pass`, :meth:`begin_step`, :meth:`accumulate`, :meth:`end_accumulation`
    and :meth:`end_step` forward the population's step protocol (module docstring).
    """

    def __init__(self, reference: ReferenceStats, population: Population, *,
                 label_embedding: LabelEmbedding | None = None):
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
        if label_embedding is not None and not isinstance(label_embedding, LabelEmbedding):
            raise TypeError(f"label_embedding must be a LabelEmbedding, got {type(label_embedding).__name__}.")
        if label_embedding is not None:
            # the label block of a joint reference has mean alpha * (class shares), which sums to alpha
            c, alpha = label_embedding.num_classes, label_embedding.alpha
            block_sum = float(reference.mu[-c:].sum()) if reference.feature_dim > c else float("nan")
            if not abs(block_sum - alpha) <= 1e-6 * alpha:
                raise ValueError(
                    f"a joint FD-loss over {c} classes with alpha {alpha:.6g} needs the joint reference of that "
                    f"embedding (dim d + {c}, its label block's mean summing to alpha; got feature_dim "
                    f"{reference.feature_dim}, block sum {block_sum:.6g}): pass "
                    "ClassConditionalStats.joint_reference_at(alpha) with the embedding's alpha."
                )
        self.reference = reference
        self.population = population
        self.label_embedding = label_embedding
        self.last_fd: float = float("nan")

    @property
    def feature_dim(self) -> int:
        """d of the encoder features this loss takes (the reference's, less the label block if joint)."""
        extra = self.label_embedding.num_classes if self.label_embedding is not None else 0
        return self.reference.feature_dim - extra

    def population_vectors(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """What the population sees of a batch: the (B, d) features, or the joint vectors (B, d + C)."""
        check_features(features, self.feature_dim,
                       f"features for reference {self.reference.encoder_id or ''}".strip())
        if self.label_embedding is None:
            if labels is not None:
                raise ValueError("labels were given to a marginal FD-loss; build it with label_embedding= for the "
                                 "joint loss, or drop the labels.")
            return features
        if labels is None:
            raise ValueError("the joint FD-loss needs the batch's class labels: pass labels=(B,) int64.")
        return self.label_embedding(features, labels)

    def warm_start(self, chunks, label_chunks=None) -> None:
        """The population's ``warm_start`` with the vectors of :meth:`population_vectors` (chunks of features and,
        for the joint loss, their labels)."""
        label_chunks = label_chunks if label_chunks is not None else itertools.repeat(None)
        self.population.warm_start(self.population_vectors(f, l) for f, l in zip(chunks, label_chunks))

    @property
    def scale(self) -> float:
        """``tr(sigma_ref)``: the FD scale of this representation (used for a relative eps)."""
        return float(self.reference.trace_sigma)

    @property
    def two_pass(self) -> bool:
        """Whether a step needs pass 1 (:meth:`accumulate` of every micro-batch) before pass 2."""
        return self.population.two_pass

    def begin_step(self) -> None:
        """Start an optimizer step (the population's :meth:`~Population.begin_step`)."""
        self.population.begin_step()

    def accumulate(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Pass 1: add one micro-batch's (B_i, d) features, computed without grad (no-op when one-pass)."""
        self.population.accumulate(self.population_vectors(features, labels))

    def end_accumulation(self) -> None:
        """End pass 1 (collective under torch.distributed for a two-pass population, else a no-op)."""
        self.population.end_accumulation()

    def end_step(self) -> None:
        """End the optimizer step (the population's :meth:`~Population.end_step`): one-pass populations
        advance once with the step's micro-batches; the exact population checks pass 2 against pass 1."""
        self.population.end_step()

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None, *, update: bool = True) -> torch.Tensor:
        mu, sigma = self.population(self.population_vectors(features, labels), update=update)
        loss = self.population.distance(self.reference, mu, sigma)
        self.last_fd = float(loss.detach())
        return loss


class EncoderModuleDict(torch.nn.ModuleDict):
    """A ``ModuleDict`` keyed by encoder names, which may hold a "." (a folder under ``/home/a.b``, a model
    ``...-v1.5``), which ``torch.nn.Module`` refuses in a module name: stored under the name with "." written
    "%2E" ("%" as "%25"); indexing, ``in``, iteration, ``keys`` and ``items`` use the names as given."""

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("%", "%25").replace(".", "%2E")

    @staticmethod
    def _name(key: str) -> str:
        return key.replace("%2E", ".").replace("%25", "%")

    def __getitem__(self, name: str) -> torch.nn.Module:
        return super().__getitem__(self._key(name))

    def __setitem__(self, name: str, module: torch.nn.Module) -> None:
        super().__setitem__(self._key(name), module)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(self._key(name))

    def __contains__(self, name: str) -> bool:
        return super().__contains__(self._key(name))

    def __iter__(self):
        return iter(self.keys())

    def keys(self):
        return [self._name(k) for k in super().keys()]

    def items(self):
        return [(self._name(k), v) for k, v in super().items()]

    def pop(self, name: str) -> torch.nn.Module:
        module = self[name]
        del self[name]
        return module


class MultiEncoderFDLoss(torch.nn.Module):
    """Several encoders: ``L = sum_i w_i F_i / (sg(F_i) + eps_i)``, ``eps_i = eps * tr(sigma_ref_i)``.

    Args:
        losses: encoder name -> :class:`FDLoss`.
        weights: encoder name -> w_i (default 1 for every encoder; missing names get 1).
        eps: relative guard, see the module docstring (default 1e-6; absolute eps_i = eps * tr(sigma_ref_i)).

    ``forward(features: dict[name, (B, d_i) tensor], labels=None) -> (loss 0-dim float64, {name: raw FD float})``;
    ``labels`` (B,) int64 go to every joint :class:`FDLoss` (and must be None when none is joint).
    The loss value is about ``sum_i w_i`` whatever the FDs; log the raw FDs, or their weighted sum
    :meth:`weighted_fd`. :attr:`two_pass`, :meth:`begin_step`, :meth:`accumulate`,
    :meth:`end_accumulation` and :meth:`end_step` run the step protocol (module docstring) for every
    encoder.
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
        self.losses = EncoderModuleDict(losses)
        self.weights = {name: float(weights.get(name, 1.0)) for name in losses}
        self.eps = float(eps)

    def eps_for(self, name: str) -> float:
        """Absolute eps_i of encoder ``name``: ``eps * tr(sigma_ref_i)``."""
        return self.eps * self.losses[name].scale

    @property
    def two_pass(self) -> bool:
        """Whether a step needs pass 1 (:meth:`accumulate`); True when any encoder's population is two-pass.

        Configure every encoder with the same population kind: in a two-pass step a one-pass
        population (EMA, queue) is called once per pass-2 micro-batch (and advanced once, at
        :meth:`end_step`).
        """
        return any(loss.two_pass for loss in self.losses.values())

    def begin_step(self) -> None:
        """Start an optimizer step for every encoder."""
        for loss in self.losses.values():
            loss.begin_step()

    @property
    def joint(self) -> bool:
        """Whether the encoders' losses are joint (take the batch's labels)."""
        return any(loss.label_embedding is not None for loss in self.losses.values())

    def _labels_for(self, loss: FDLoss, labels):
        return labels if loss.label_embedding is not None else None

    def accumulate(self, features: dict[str, torch.Tensor], labels: torch.Tensor | None = None) -> None:
        """Pass 1: add one micro-batch's no-grad features ``{name: (B_i, d_i)}`` (no-op for one-pass)."""
        self._check_names(features, "features", "(B, d) tensor", "feature tensor")
        self._check_labels(labels)
        for name, loss in self.losses.items():
            loss.accumulate(features[name], self._labels_for(loss, labels))

    def end_accumulation(self) -> None:
        """End pass 1 for every encoder (collective for two-pass populations, else a no-op)."""
        for loss in self.losses.values():
            loss.end_accumulation()

    def end_step(self) -> None:
        """End the optimizer step for every encoder (:meth:`FDLoss.end_step`; collective for two-pass
        populations)."""
        for loss in self.losses.values():
            loss.end_step()

    def weighted_fd(self, raw: dict[str, float]) -> float:
        """``sum_i w_i F_i`` of the raw FDs returned by :meth:`forward`: an informative scalar to log.

        (The loss itself is ``sum_i w_i F_i / (sg(F_i) + eps_i)``, about ``sum_i w_i`` at every step.)
        """
        self._check_names(raw, "raw FDs", "FD", "raw FD")
        return sum(self.weights[name] * float(raw[name]) for name in self.losses)

    def _check_names(self, per_encoder, what: str, value: str, one: str) -> None:
        """Raise unless ``per_encoder`` is a dict with exactly the configured encoder names."""
        if not isinstance(per_encoder, dict):
            raise TypeError(f"{what} must be a dict {{encoder name: {value}}}, one entry per encoder.")
        missing = sorted(set(self.losses) - set(per_encoder))
        extra = sorted(set(per_encoder) - set(self.losses))
        if missing or extra:
            raise ValueError(
                f"{what} are for encoders {sorted(per_encoder)} but the loss expects {sorted(self.losses)} "
                f"(missing {missing}, unexpected {extra}); pass one {one} per configured encoder."
            )

    def _check_labels(self, labels) -> None:
        if labels is not None and not self.joint:
            raise ValueError("labels were given but no encoder's FD-loss is joint; drop them (marginal FD-loss).")

    def forward(self, features: dict[str, torch.Tensor], labels: torch.Tensor | None = None, *, update: bool = True):
        self._check_names(features, "features", "(B, d) tensor", "feature tensor")
        self._check_labels(labels)
        total = None
        raw: dict[str, float] = {}
        for name, loss_fn in self.losses.items():
            fd = loss_fn(features[name], self._labels_for(loss_fn, labels), update=update)
            raw[name] = float(fd.detach())
            term = self.weights[name] * fd / (fd.detach() + self.eps_for(name))
            total = term if total is None else total + term
        return total, raw
