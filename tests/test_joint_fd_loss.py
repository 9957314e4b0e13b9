"""Specification of the joint FD-loss: FD of [features, alpha * one_hot(label)] against the joint reference."""

import pytest
import torch

from fd_onestep.conditioning_metrics import (
    ClassConditionalMoments,
    ClassConditionalStats,
    LabelEmbedding,
    joint_features,
)
from fd_onestep.frechet import frechet_distance
from fd_onestep.losses import FDLoss, MultiEncoderFDLoss
from fd_onestep.populations import build_population

C, D = 3, 4


def _class_features(labels, generator):
    """Features whose mean depends on the class: class c is shifted by 2 along axis c."""
    x = torch.randn(labels.shape[0], D, generator=generator, dtype=torch.float64)
    x[torch.arange(labels.shape[0]), labels] += 2.0
    return x


def _class_stats(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % C
    moments = ClassConditionalMoments(D, C).update(_class_features(labels, g), labels)
    return ClassConditionalStats.from_moments(moments, encoder_id="enc")


def _joint_loss(stats, kind="queue", scale=1.0, **kwargs):
    alpha = scale * stats.alpha
    kwargs = {"queue": {"queue_size": 1, "storage_dtype": torch.float64}, "ema": {"beta": 0.0},
              "exact": {"micro_batches": 2}}[kind] | kwargs
    population = build_population(kind, D + C, **kwargs)
    return FDLoss(stats.joint_reference_at(alpha), population, label_embedding=LabelEmbedding(C, alpha))


def test_joint_loss_is_the_fd_of_the_joint_vectors_and_only_the_features_get_gradient():
    stats = _class_stats()
    loss_fn = _joint_loss(stats, scale=0.7)
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(60) % C
    feats = _class_features(labels, g).requires_grad_()
    loss = loss_fn(feats, labels)
    joint = joint_features(feats.detach(), labels, C, 0.7 * stats.alpha)
    ref = stats.joint_reference_at(0.7 * stats.alpha)
    expected = frechet_distance(ref.mu, ref.sigma, joint.mean(0), torch.cov(joint.T))
    assert abs(float(loss.detach()) - float(expected)) <= 1e-10 * float(expected)
    loss.backward()
    assert feats.grad.shape == (60, D) and torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


def test_joint_loss_sees_a_generator_that_ignores_its_label_where_the_marginal_loss_does_not():
    stats = _class_stats()
    marginal = FDLoss(_marginal_reference(stats),
                      build_population("queue", D, queue_size=1, storage_dtype=torch.float64))
    joint = _joint_loss(stats)
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(3000) % C
    feats = _class_features(labels, g)
    ignored = labels[torch.randperm(3000, generator=g)]  # the same images, asked for other classes
    fd_marginal = float(marginal(feats))
    fd_follow, fd_ignore = float(joint(feats, labels)), float(joint(feats, ignored))
    assert fd_marginal < 0.02  # the marginal loss cannot tell them apart
    assert fd_follow < 0.05 and fd_ignore > 20 * fd_follow


def _marginal_reference(stats):
    from fd_onestep.reference_stats import ReferenceStats

    return ReferenceStats.from_moments(stats.moments.marginal(), encoder_id="enc")


@pytest.mark.parametrize("kind", ["ema", "queue", "exact"])
def test_joint_loss_runs_the_step_protocol_for_every_population_kind(kind):
    stats = _class_stats()
    multi = MultiEncoderFDLoss({"enc": _joint_loss(stats, kind)})
    assert multi.joint
    g = torch.Generator().manual_seed(3)
    micro = []
    for _ in range(2):
        labels = torch.randint(0, C, (16,), generator=g)
        micro.append((_class_features(labels, g).float(), labels))
    multi.begin_step()
    if multi.two_pass:
        for feats, labels in micro:
            multi.accumulate({"enc": feats}, labels)
    multi.end_accumulation()
    for feats, labels in micro:
        feats = feats.clone().requires_grad_()
        loss, raw = multi({"enc": feats}, labels)
        loss.backward()
        assert torch.isfinite(feats.grad).all() and raw["enc"] > 0
    multi.end_step()  # exact: pass 2 saw pass 1's joint vectors bitwise


def test_joint_loss_warm_start_takes_the_labels_of_each_chunk():
    stats = _class_stats()
    loss_fn = _joint_loss(stats, "ema", beta=0.5)
    g = torch.Generator().manual_seed(4)
    labels = [torch.arange(50) % C, torch.arange(30) % C]
    chunks = [_class_features(l, g) for l in labels]
    loss_fn.warm_start(chunks, labels)
    joint = torch.cat([joint_features(f, l, C, stats.alpha) for f, l in zip(chunks, labels)])
    mu, _ = loss_fn.population.statistics()
    torch.testing.assert_close(mu, joint.mean(0), rtol=1e-12, atol=1e-12)


def test_joint_and_marginal_losses_refuse_the_wrong_labels_naming_the_fix():
    stats = _class_stats()
    joint = _joint_loss(stats)
    with pytest.raises(ValueError, match="needs the batch's class labels"):
        joint(torch.randn(8, D))
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        joint(torch.randn(8, D), torch.full((8,), 3))
    marginal = FDLoss(_marginal_reference(stats), build_population("ema", D))
    with pytest.raises(ValueError, match="labels were given to a marginal FD-loss"):
        marginal(torch.randn(8, D), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="no encoder's FD-loss is joint"):
        MultiEncoderFDLoss({"enc": marginal})({"enc": torch.randn(8, D)}, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="needs the joint reference"):
        FDLoss(_marginal_reference(stats), build_population("ema", D), label_embedding=LabelEmbedding(C, 1.0))
    with pytest.raises(ValueError, match="joint reference of that embedding"):  # another alpha than the reference's
        FDLoss(stats.joint_reference_at(stats.alpha), build_population("ema", D + C),
               label_embedding=LabelEmbedding(C, 2 * stats.alpha))


def test_the_joint_reference_is_formed_once_per_alpha_so_loss_and_validation_share_it():
    stats = _class_stats()
    assert stats.joint_reference_at(0.5 * stats.alpha) is stats.joint_reference_at(0.5 * stats.alpha)
    assert stats.joint_reference is stats.joint_reference_at(stats.alpha)
    assert stats.joint_reference_at(0.5 * stats.alpha) is not stats.joint_reference
