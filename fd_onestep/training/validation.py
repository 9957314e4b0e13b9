"""Validation measures: FD (FD_r, per-class FD, FJD, the joint loss's FD, adherence) of fresh samples in every
representation, and the number ``--keep_best_by`` ranks pipelines by."""

from __future__ import annotations


from accelerate.logging import get_logger

from fd_onestep.training.generation import stream_features
from fd_onestep.training.representations import Representations

logger = get_logger(__name__, log_level="INFO")


# The fresh-vs-population FD warning needs this many validation samples per feature dimension: with fewer, the
# fresh FD's own small-sample bias (of order d / N) can exceed the population FD of a well-trained generator.
FRESH_FD_MIN_SAMPLES_PER_DIM = 2


def loss_label_embedding(args, class_ref):
    """The joint FD-loss's ``LabelEmbedding`` for an encoder's per-class statistics: alpha = ``--fd_label_scale``
    times their trace-matching scale."""
    from fd_onestep.conditioning_metrics import LabelEmbedding

    return LabelEmbedding(class_ref.num_classes, args.fd_label_scale * class_ref.alpha)


def fresh_sample_fds(args, accelerator, gen, model, reps: Representations, total: int, seed: int,
                     batch_size: int) -> tuple[dict, float | None]:
    """FD of ``total`` fresh samples vs the references, in every training and eval encoder.

    Class-conditional models (balanced labels with uniform label sampling): also per-class FD and FJD where
    per-class statistics exist, the joint FD at the loss's own alpha (``loss_fd``, what the joint loss's
    population FD estimates) and adherence with ``--classifier``.
    Returns ``({name: {...}}, adherence or None)``.
    """
    from fd_onestep.conditioning_metrics import (
        AdherenceCounter,
        ClassConditionalMoments,
        frechet_joint_distance,
        joint_moments,
        per_class_frechet_distances,
    )
    from fd_onestep.moments import FeatureMoments

    device = accelerator.device
    all_references = reps.all_references
    moments = {name: FeatureMoments(enc.feature_dim, device=device) for name, enc in reps.all_encoders.items()}
    conditional = gen.labeled
    class_moments = {name: ClassConditionalMoments(reps.all_encoders[name].feature_dim, ref.num_classes, device=device)
                     for name, ref in reps.class_references.items()} if conditional else {}
    counter = AdherenceCounter() if conditional and reps.classifier is not None else None

    def classify(images, start, labels):
        counter.update(reps.classifier(images), labels)

    balanced = conditional and args.class_label_distribution == "uniform"
    for feats, labels in stream_features(accelerator, gen, model, total, seed, reps.all_encoders, batch_size,
                                         on_images=classify if counter is not None else None, balanced=balanced):
        if feats is not None:
            for name, f in feats.items():
                moments[name].update(f)
                if name in class_moments:
                    class_moments[name].update(f, labels)
    out = {}
    for name, m in moments.items():
        m.all_reduce()
        fd = float(all_references[name].frechet_distance(m.mean, m.covariance()))
        vfd = all_references[name].validation_fd
        out[name] = {"fresh_fd": fd, "fd_r": (fd / vfd) if vfd else None, "in_loss": name in reps.encoders}
    for cm in class_moments.values():
        cm.all_reduce()
    counts = next(iter(class_moments.values())).class_counts if class_moments else None
    if counts is not None and int(counts[counts > 0].min()) < 2:
        # too few samples of some requested class for its covariance: no per-class measures this time
        logger.warning(f"per-class FD and FJD skipped: {int((counts == 1).sum())} class(es) got a single one of the "
                       f"{total} validation samples; raise --num_validation_samples (>= 2 per class, far more for "
                       "a meaningful per-class FD).")
        class_moments = {}
    for name, cm in class_moments.items():
        class_ref = reps.class_references[name]
        distances = per_class_frechet_distances(cm, class_ref)
        out[name]["per_class_fd"] = sum(distances.values()) / len(distances)
        out[name]["fjd"] = frechet_joint_distance(cm, class_ref)
        if args.fd_condition == "joint" and name in reps.encoders:
            alpha = loss_label_embedding(args, class_ref).alpha
            joint = joint_moments(cm, alpha)  # the loss's own reference (cached with its factor)
            out[name]["loss_fd"] = float(class_ref.joint_reference_at(alpha).frechet_distance(joint.mean, joint.covariance()))
    adherence = counter.all_reduce(device).compute() if counter is not None else None
    return out, adherence


# Validation and saving
def keep_metric(args, fds, train_names) -> float:
    """The fresh-sample number ``--keep_best_by`` ranks pipelines by (lower is better)."""
    if args.keep_best_by == "fd_mean":
        return sum(fds[n]["fresh_fd"] for n in train_names) / len(train_names)
    if args.keep_best_by == "fd_r_mean":
        rs = [fds[n]["fd_r"] for n in train_names]
        if any(r is None for r in rs):
            raise ValueError(
                "--keep_best_by fd_r_mean needs validation_fd in every training encoder's reference stats "
                "(compute them with a validation split), or use 'fd_mean' or an encoder name."
            )
        return sum(rs) / len(rs)
    return fds[args.keep_best_by]["fresh_fd"]
