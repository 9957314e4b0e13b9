"""Does a conditional generator follow its condition? Adherence, per-class FD and the Fréchet Joint Distance.

FD compares the *marginal* feature distribution of generated images with the reference: a class-conditional
generator that ignores its label and draws from the class mixture gets a good FD. Three measures see it:

- **adherence**: the share of samples that a classifier assigns to the class they were generated for
  (:func:`adherence`, accumulated over batches and processes by :class:`AdherenceCounter`);
- **per-class FD**: the mean over classes c of ``FD(generated features of class c, reference of class c)``
  (:func:`per_class_frechet_distances`);
- **Fréchet Joint Distance** (FJD; DeVries et al. 2019, "On the Evaluation of Conditional GANs"): the FD of
  the joint Gaussian of ``[image feature z (d,), condition embedding e (C,)]``. For class labels the
  embedding is ``e = alpha * one_hot(label)`` (:func:`joint_features`); :func:`frechet_joint_distance`.

Moments. Everything is computed from per-class raw moments (:class:`ClassConditionalMoments`: one
:class:`~fd_onestep.moments.FeatureMoments` per class). They give the marginal moments (their sum) and the
joint moments for any ``alpha`` *exactly*, without a second pass (:func:`joint_moments`):

    sum_j [z_j; alpha e_j]                = [sum_c S_c; alpha n]
    sum_j [z_j; alpha e_j][z_j; alpha e_j]^T = [[sum_c Q_c, alpha S^T], [alpha S, alpha^2 diag(n)]]

with ``n`` (C,) the class counts, ``S`` (C, d) the per-class feature sums (row c = ``S_c``) and ``Q_c`` the
per-class ``sum z z^T``. Covariances and FDs are those of :mod:`fd_onestep.moments` /
:mod:`fd_onestep.reference_stats` (unbiased, float64).

Embedding scale ``alpha`` (a setting; :func:`label_embedding_scale` is the default): chosen on the
reference so that the label block carries as much variance as the feature block,

    trace(alpha^2 Cov(one_hot)) = trace(Sigma_features),  i.e.  alpha = sqrt(trace(Sigma_f) / trace(Cov(one_hot)))

with ``trace(Cov(one_hot)) = (n - sum_c n_c^2 / n) / (n - 1)`` (unbiased; ``1 - 1/C`` times ``n / (n - 1)``
for balanced classes). ``alpha`` is stored with the reference (:class:`ClassConditionalStats`), so the
generated and the reference joint vectors use the same one. Units: ``alpha`` is in feature units (the
one-hot is unitless), FJD in squared feature units, like FD.

Memory: the per-class moments hold ``num_classes * d^2`` float64 numbers (10 digits at d = 256: 5 MB;
ImageNet's 1,000 classes at Inception's d = 2048: 34 GB); files store the upper triangles, half of that.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch

from fd_onestep.distributed import all_reduce_sum
from fd_onestep.moments import FeatureMoments, check_features, covariance_from_moments
from fd_onestep.reference_stats import ReferenceStats, write_file_atomically

__all__ = [
    "AdherenceCounter",
    "ClassConditionalMoments",
    "LabelEmbedding",
    "ClassConditionalStats",
    "adherence",
    "check_labels",
    "frechet_joint_distance",
    "joint_features",
    "joint_moments",
    "label_embedding",
    "label_embedding_scale",
    "one_hot_covariance_trace",
    "per_class_frechet_distances",
]

_FORMAT = "fd_onestep.ClassConditionalStats"


# --------------------------------------------------------------------------------------------- pure functions
def check_labels(labels: torch.Tensor, num_classes: Optional[int], count: Optional[int] = None,
                 name: str = "labels") -> None:
    """Raise ``ValueError`` unless ``labels`` is an integer (N,) tensor with values in ``[0, num_classes)``.

    ``count``: the N it must have (the number of images / features it labels), if known.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N,), got {type(labels).__name__}.")
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape (N,), got {labels.dtype} {tuple(labels.shape)}.")
    if count is not None and labels.shape[0] != count:
        raise ValueError(f"{name} have {labels.shape[0]} entries for {count} samples; pass one label per sample.")
    if num_classes is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got values in [{int(labels.min())}, {int(labels.max())}]; "
            "unlabeled rows (e.g. ImageNet's test split, label -1) cannot give class statistics."
        )


def adherence(predicted_labels: torch.Tensor, requested_labels: torch.Tensor) -> float:
    """Share of samples that the classifier assigns to the requested class.

    Args:
        predicted_labels: (N,) int64, the classifier's class per sample.
        requested_labels: (N,) int64, the class each sample was generated for.
    Returns:
        a number in [0, 1] (unitless): ``mean(predicted == requested)``.
    """
    return AdherenceCounter().update(predicted_labels, requested_labels).compute()


def label_embedding(labels: torch.Tensor, num_classes: int, alpha: float) -> torch.Tensor:
    """``alpha * one_hot(labels)``: (N,) int64 labels -> (N, num_classes) float64 (alpha in feature units)."""
    check_labels(labels, num_classes)
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64) * float(alpha)


def joint_features(features: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float) -> torch.Tensor:
    """FJD's joint vectors ``[z, alpha * one_hot(label)]``: (N, d) features, (N,) int64 -> (N, d + C) float64."""
    check_features(features, None)
    check_labels(labels, num_classes, features.shape[0])
    embedding = label_embedding(labels.to(features.device), num_classes, alpha)
    return torch.cat([features.to(torch.float64), embedding], dim=1)


class LabelEmbedding:
    """The condition block of joint vectors: ``(features (B, d), labels (B,)) -> [features, alpha * one_hot]``.

    What the joint FD-loss feeds its population (``FDLoss(..., label_embedding=)``) and what FJD measures, with
    the same formula (:func:`joint_features`). The result keeps the features' dtype (the encoders' float32),
    so an exact population's pass-2 check keeps its tolerance; only the feature block carries gradient.

    Args:
        num_classes: C, the width of the one-hot block.
        alpha: the embedding scale (feature units), e.g. ``ClassConditionalStats.alpha`` times a factor.
    """

    def __init__(self, num_classes: int, alpha: float):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        if not (math.isfinite(float(alpha)) and float(alpha) > 0):
            raise ValueError(f"the label embedding scale alpha must be a positive number, got {alpha}.")
        self.num_classes, self.alpha = int(num_classes), float(alpha)

    def __call__(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return joint_features(features, labels, self.num_classes, self.alpha).to(features.dtype)

    def __repr__(self) -> str:
        return f"LabelEmbedding(num_classes={self.num_classes}, alpha={self.alpha:.6g})"


def one_hot_covariance_trace(class_counts: torch.Tensor) -> float:
    """``trace(Cov(one_hot))`` (unbiased) of samples with (C,) class counts: ``(n - sum n_c^2 / n) / (n - 1)``."""
    counts = class_counts.to(torch.float64).cpu()
    n = float(counts.sum())
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, the class counts sum to {n:g}.")
    # one_hot's mean is p = n_c / n and its sum of outer products diag(n_c)
    return float(covariance_from_moments(counts / n, torch.diag(counts), n, n - 1).diagonal().sum())


def label_embedding_scale(feature_covariance_trace: float, class_counts: torch.Tensor) -> float:
    """Default ``alpha``: ``sqrt(trace(Sigma_f) / trace(Cov(one_hot)))`` so that both blocks have equal trace.

    Args:
        feature_covariance_trace: ``trace(Sigma_f)`` of the reference features (squared feature units).
        class_counts: (C,) reference samples per class (int64).
    Returns:
        alpha (feature units) with ``trace(alpha^2 Cov(one_hot)) = trace(Sigma_f)``.
    """
    label_trace = one_hot_covariance_trace(class_counts)
    if label_trace <= 0:
        raise ValueError("all reference samples have one class: the label block has no variance, alpha is undefined.")
    return math.sqrt(float(feature_covariance_trace) / label_trace)


# --------------------------------------------------------------------------------------------- accumulators
class ClassConditionalMoments:
    """Float64 raw moments of d-dimensional features per class (one :class:`FeatureMoments` per class).

    Example::

        moments = ClassConditionalMoments(2048, num_classes=1000)
        for images, labels in loader:                  # labels: (B,) int64 in [0, 1000)
            moments.update(encoder(images), labels)
        moments.all_reduce()                           # sum over processes (no-op when not distributed)
        marginal = moments.marginal()                  # FeatureMoments of all samples

    Device: like :class:`FeatureMoments` (``device=None``: the device of the first features).
    """

    def __init__(self, dim: int, num_classes: int, *, device: torch.device | str | None = None):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.dim = int(dim)
        self.num_classes = int(num_classes)
        self.classes: List[FeatureMoments] = [FeatureMoments(dim, device=device) for _ in range(self.num_classes)]

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> "ClassConditionalMoments":
        """Add (B, d) features (any float dtype) with their (B,) int64 labels in ``[0, num_classes)``."""
        check_features(features, self.dim)
        check_labels(labels, self.num_classes, features.shape[0])
        labels = labels.to(features.device)
        for c in torch.unique(labels).tolist():
            self.classes[c].update(features[labels == c])
        return self

    @property
    def class_counts(self) -> torch.Tensor:
        """(C,) int64 samples per class (CPU)."""
        return torch.tensor([m.count for m in self.classes], dtype=torch.int64)

    @property
    def device(self) -> torch.device:
        return self.classes[0].sum.device

    def marginal(self) -> FeatureMoments:
        """The moments of all samples (the sum over classes), a new :class:`FeatureMoments`."""
        out = FeatureMoments(self.dim, device=self.device)
        for m in self.classes:
            out.merge(m)
        return out

    def all_reduce(self) -> "ClassConditionalMoments":
        """Sum every class's moments over ``torch.distributed`` processes (collective; one call per class)."""
        for m in self.classes:
            m.all_reduce()
        return self

    def merge(self, other: "ClassConditionalMoments") -> "ClassConditionalMoments":
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge moments of {other.num_classes} classes into {self.num_classes}.")
        for mine, theirs in zip(self.classes, other.classes):
            mine.merge(theirs)
        return self

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """``class_counts`` (C,) int64, ``class_sum`` (C, d) and ``class_sum_outer`` (C, d, d) float64 (CPU)."""
        return {
            "class_counts": self.class_counts,
            "class_sum": torch.stack([m.sum.cpu() for m in self.classes]),
            "class_sum_outer": torch.stack([m.sum_outer.cpu() for m in self.classes]),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "ClassConditionalMoments":
        counts, sums, outers = state["class_counts"], state["class_sum"], state["class_sum_outer"]
        out = cls(sums.shape[1], sums.shape[0], device=sums.device)
        for c, m in enumerate(out.classes):
            m.load_state_dict({"count": counts[c], "sum": sums[c], "sum_outer": outers[c]})
        return out

    def __repr__(self) -> str:
        return f"ClassConditionalMoments(dim={self.dim}, num_classes={self.num_classes}, count={int(self.class_counts.sum())})"


def joint_moments(moments: ClassConditionalMoments, alpha: float) -> FeatureMoments:
    """Raw moments (dim d + C) of the joint vectors ``[z, alpha * one_hot(label)]``, exactly, from per-class moments.

    See the module docstring for the block formula; equals ``FeatureMoments.from_features(joint_features(...))``
    of the same samples up to float64 round-off.
    """
    alpha = float(alpha)
    marginal = moments.marginal()
    device = marginal.sum.device
    counts = moments.class_counts.to(device=device, dtype=torch.float64)
    sums = torch.stack([m.sum.to(device) for m in moments.classes])  # (C, d)
    sum_outer = torch.cat([
        torch.cat([marginal.sum_outer, alpha * sums.mT], dim=1),
        torch.cat([alpha * sums, alpha * alpha * torch.diag(counts)], dim=1),
    ], dim=0)
    out = FeatureMoments(moments.dim + moments.num_classes, device=device)
    out.load_state_dict({"count": torch.tensor(marginal.count), "sum": torch.cat([marginal.sum, alpha * counts]),
                         "sum_outer": sum_outer})
    return out


class AdherenceCounter:
    """Accumulates :func:`adherence` over batches and processes: ``update(predicted, requested)``, ``compute()``."""

    def __init__(self):
        self.correct = 0
        self.total = 0

    def update(self, predicted_labels: torch.Tensor, requested_labels: torch.Tensor) -> "AdherenceCounter":
        """Add a batch: (B,) int64 classifier predictions and the (B,) int64 classes requested."""
        check_labels(requested_labels, None, name="requested_labels")
        check_labels(predicted_labels, None, requested_labels.shape[0], name="predicted_labels")
        self.correct += int((predicted_labels.cpu() == requested_labels.cpu()).sum())
        self.total += int(requested_labels.shape[0])
        return self

    def all_reduce(self, device: torch.device | str | None = None) -> "AdherenceCounter":
        """Sum the counts over ``torch.distributed`` processes (collective; ``device``: the process's device)."""
        packed = all_reduce_sum(torch.tensor([self.correct, self.total], dtype=torch.int64, device=device))
        self.correct, self.total = int(packed[0]), int(packed[1])
        return self

    def compute(self) -> float:
        """Share of the samples seen that were assigned to their requested class."""
        if self.total == 0:
            raise ValueError("adherence of 0 samples is undefined; update() with some samples first.")
        return self.correct / self.total


# --------------------------------------------------------------------------------------------- reference statistics
class ClassConditionalStats:
    """Per-class reference moments of one encoder, with the label embedding scale ``alpha`` of FJD.

    Gives per-class :class:`ReferenceStats` (:meth:`class_reference`) and the joint reference of
    ``[z, alpha * one_hot(label)]`` (:attr:`joint_reference`), both cached. A file of its own
    (``<encoder>.classes.safetensors``, written by ``fd-onestep stats --label_column``) next to the marginal
    ``<encoder>.safetensors``, which stays a plain :class:`ReferenceStats` file.

    Attributes:
        moments: :class:`ClassConditionalMoments` of the reference features (CPU).
        alpha: label embedding scale (feature units).
        metadata: provenance strings (encoder_id, dataset, split, label_column, ...); the file also
            stores ``num_classes``, ``alpha``, ``class_counts`` (JSON list) and ``feature_dim``.
    """

    def __init__(self, moments: ClassConditionalMoments, alpha: float, metadata: Optional[Mapping[str, str]] = None):
        self.moments = ClassConditionalMoments(moments.dim, moments.num_classes, device="cpu").merge(moments)
        self.alpha = float(alpha)
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"the label embedding scale alpha must be a positive number, got {alpha}.")
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._class_references: Dict[int, ReferenceStats] = {}
        self._joint_references: Dict[float, ReferenceStats] = {}

    @classmethod
    def from_moments(cls, moments: ClassConditionalMoments, *, alpha: Optional[float] = None,
                     **metadata) -> "ClassConditionalStats":
        """Reference from accumulated per-class moments; ``alpha=None``: :func:`label_embedding_scale` of them."""
        if alpha is None:
            trace = float(moments.marginal().covariance().diagonal().sum())
            alpha = label_embedding_scale(trace, moments.class_counts)
        return cls(moments, alpha, metadata)

    @property
    def num_classes(self) -> int:
        return self.moments.num_classes

    @property
    def feature_dim(self) -> int:
        return self.moments.dim

    @property
    def encoder_id(self) -> Optional[str]:
        return self.metadata.get("encoder_id")

    @property
    def class_counts(self) -> torch.Tensor:
        return self.moments.class_counts

    def class_reference(self, c: int) -> ReferenceStats:
        """:class:`ReferenceStats` of the reference features of class ``c`` (cached)."""
        if not 0 <= int(c) < self.num_classes:
            raise ValueError(f"class {c} is outside [0, {self.num_classes}).")
        c = int(c)
        if c not in self._class_references:
            m = self.moments.classes[c]
            if m.count < 2:
                raise ValueError(f"the reference has {m.count} sample(s) of class {c}; per-class FD needs at least 2.")
            self._class_references[c] = ReferenceStats.from_moments(m, **self.metadata, **{"class": str(c)})
        return self._class_references[c]

    @property
    def joint_reference(self) -> ReferenceStats:
        """:class:`ReferenceStats` (dim d + C) of the joint vectors ``[z, alpha * one_hot(label)]``."""
        return self.joint_reference_at(self.alpha)

    def joint_reference_at(self, alpha: float) -> ReferenceStats:
        """:class:`ReferenceStats` (dim d + C) of ``[z, alpha * one_hot(label)]`` for any ``alpha`` (exact, from
        the per-class moments): the joint FD-loss's reference at its own embedding scale. Cached per alpha, so
        the loss and validation share one reference and its factor."""
        alpha = float(alpha)
        if alpha not in self._joint_references:
            self._joint_references[alpha] = ReferenceStats.from_moments(
                joint_moments(self.moments, alpha), **self.metadata, alpha=repr(alpha))
        return self._joint_references[alpha]

    def check_compatible(self, encoder_id: Optional[str], feature_dim: int) -> None:
        """Like :meth:`ReferenceStats.check_compatible` (encoder id and feature dimension)."""
        # the check reads only feature_dim and encoder_id, which this class has too
        ReferenceStats.check_compatible(self, encoder_id, feature_dim)

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file: tensors ``class_counts`` (C,), ``class_sum`` (C, d) and
        ``class_sum_outer_triu`` (C, d (d + 1) / 2: the upper triangles of the symmetric per-class
        ``sum z z^T``, row-major as ``torch.triu_indices``; half the bytes, the same numbers); metadata strings."""
        from safetensors.torch import save

        state = self.moments.state_dict()
        rows, cols = torch.triu_indices(self.feature_dim, self.feature_dim)
        state["class_sum_outer_triu"] = state.pop("class_sum_outer")[:, rows, cols].contiguous()
        meta = dict(self.metadata)
        meta.update(format=_FORMAT, num_classes=str(self.num_classes), feature_dim=str(self.feature_dim),
                    alpha=repr(self.alpha), class_counts=json.dumps(self.class_counts.tolist()))
        write_file_atomically(Path(path), save(state, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClassConditionalStats":
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"class statistics file {str(path)!r} does not exist; compute it with "
                                    "`fd-onestep stats --label_column label ...`.")
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{str(path)!r} is not a class statistics file (format {meta.get('format')!r}); "
                                 "pass the <encoder>.classes.safetensors written by `fd-onestep stats --label_column`.")
            state = {k: f.get_tensor(k) for k in ("class_counts", "class_sum")}
            if "class_sum_outer_triu" in f.keys():  # the packed upper triangles (see save)
                packed = f.get_tensor("class_sum_outer_triu")
                d = state["class_sum"].shape[1]
                rows, cols = torch.triu_indices(d, d)
                full = torch.zeros(packed.shape[0], d, d, dtype=packed.dtype)
                full[:, rows, cols] = packed
                full[:, cols, rows] = packed
                state["class_sum_outer"] = full
            else:  # files written before the packing
                state["class_sum_outer"] = f.get_tensor("class_sum_outer")
        alpha = float(meta.pop("alpha"))
        for key in ("format", "num_classes", "feature_dim", "class_counts"):
            meta.pop(key, None)
        return cls(ClassConditionalMoments.from_state_dict(state), alpha, meta)

    def __repr__(self) -> str:
        return (f"ClassConditionalStats(feature_dim={self.feature_dim}, num_classes={self.num_classes}, "
                f"alpha={self.alpha:.6g}, encoder_id={self.encoder_id!r})")


# --------------------------------------------------------------------------------------------- distances
def per_class_frechet_distances(generated: ClassConditionalMoments, reference: ClassConditionalStats) -> Dict[int, float]:
    """``{c: FD(generated class c, reference class c)}`` for every class with generated samples (float, squared
    feature units). Per-class FD is their mean. A class with generated samples needs at least 2 of them."""
    _check_pair(generated, reference)
    distances = {}
    for c, m in enumerate(generated.classes):
        if m.count == 0:
            continue
        if m.count < 2:
            raise ValueError(f"1 generated sample of class {c}; per-class FD needs at least 2 per class "
                             "(generate more samples, e.g. num_samples >= 2 * num_classes, balanced).")
        distances[c] = float(reference.class_reference(c).frechet_distance(m.mean, m.covariance()))
    if not distances:
        raise ValueError("no generated samples: per-class FD is undefined.")
    return distances


def frechet_joint_distance(generated: ClassConditionalMoments, reference: ClassConditionalStats) -> float:
    """FJD: FD between the joint Gaussians of ``[z, alpha * one_hot(label)]``, generated vs reference, with the
    reference's ``alpha`` (squared feature units)."""
    _check_pair(generated, reference)
    joint = joint_moments(generated, reference.alpha)
    return float(reference.joint_reference.frechet_distance(joint.mean, joint.covariance()))


def _check_pair(generated: ClassConditionalMoments, reference: ClassConditionalStats) -> None:
    if generated.dim != reference.feature_dim or generated.num_classes != reference.num_classes:
        raise ValueError(
            f"generated moments (d={generated.dim}, {generated.num_classes} classes) do not match the reference "
            f"(d={reference.feature_dim}, {reference.num_classes} classes, encoder {reference.encoder_id!r})."
        )
