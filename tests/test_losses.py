"""Specification of FDLoss and MultiEncoderFDLoss."""

import pytest
import torch

from fd_onestep.frechet import frechet_distance
from fd_onestep.losses import FDLoss, MultiEncoderFDLoss
from fd_onestep.populations import EMAPopulation, QueuePopulation
from fd_onestep.reference_stats import ReferenceStats


def _reference(d, scale, seed=0, encoder_id="enc"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, d, generator=g, dtype=torch.float64) * scale
    return ReferenceStats.from_features(x, encoder_id=encoder_id)


def test_fd_loss_is_the_fd_of_the_population_and_differentiable():
    ref = _reference(6, 1.0)
    pop = QueuePopulation(6, queue_size=20, storage_dtype=torch.float64)
    loss_fn = FDLoss(ref, pop)
    feats = (torch.randn(10, 6, dtype=torch.float64) + 0.5).requires_grad_()
    loss = loss_fn(feats)
    expected = frechet_distance(ref.mu, ref.sigma, feats.detach().mean(0), torch.cov(feats.detach().T))
    assert loss.ndim == 0 and loss.dtype == torch.float64
    assert abs(float(loss.detach()) - float(expected)) <= 1e-12 * float(expected)
    assert loss_fn.last_fd == float(loss.detach())
    loss.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    assert "population.sum_outer" in loss_fn.state_dict()  # population state is checkpointed with the loss


def test_fd_loss_accepts_float32_features_and_returns_float64():
    loss_fn = FDLoss(_reference(4, 1.0), EMAPopulation(4, beta=0.9))
    feats = torch.randn(8, 4, requires_grad=True)
    loss = loss_fn(feats)
    loss.backward()
    assert loss.dtype == torch.float64 and feats.grad.dtype == torch.float32


def test_fd_loss_refuses_mismatched_dimensions_naming_the_fix():
    with pytest.raises(ValueError, match="population has dim 5.*feature_dim 4"):
        FDLoss(_reference(4, 1.0), EMAPopulation(5))
    loss_fn = FDLoss(_reference(4, 1.0, encoder_id="dinov2"), EMAPopulation(4))
    with pytest.raises(ValueError, match="dimension 3 but 4 was expected"):
        loss_fn(torch.randn(8, 3))
    with pytest.raises(TypeError, match="ReferenceStats"):
        FDLoss({"mu": 0}, EMAPopulation(4))


def test_small_fd_encoder_is_not_damped_relative_to_large_fd_encoder():
    # encoder "small": features of scale 0.1 (tr(sigma) ~ 0.16), raw FD ~ 0.04;
    # encoder "large": scale 10 (tr(sigma) ~ 1600), raw FD ~ 40
    d, b = 16, 400
    small = FDLoss(_reference(d, 0.1, seed=1), QueuePopulation(d, queue_size=1, storage_dtype=torch.float64))
    large = FDLoss(_reference(d, 10.0, seed=2), QueuePopulation(d, queue_size=1, storage_dtype=torch.float64))
    multi = MultiEncoderFDLoss({"small": small, "large": large})
    g = torch.Generator().manual_seed(3)
    f_small = (torch.randn(b, d, generator=g, dtype=torch.float64) * 0.1 + 0.047).requires_grad_()
    f_large = (torch.randn(b, d, generator=g, dtype=torch.float64) * 10 + 1.5).requires_grad_()
    loss, raw = multi({"small": f_small, "large": f_large}, update=False)
    assert 0.02 < raw["small"] < 0.08 and 20 < raw["large"] < 80
    loss.backward()
    # dL/dfeatures_i = w_i / (F_i + eps_i) * dF_i/dfeatures_i; compare with the undamped 1 / F_i
    for name, feats, fn in (("small", f_small, small), ("large", f_large, large)):
        feats_again = feats.detach().clone().requires_grad_()
        fn(feats_again, update=False).backward()
        undamped = feats_again.grad / raw[name]
        ratio = float((feats.grad * undamped).sum() / (undamped * undamped).sum())
        assert abs(ratio - 1.0) <= 1e-4, (name, ratio)
    # the research code's absolute eps = 0.01 would weight the small encoder by 0.04 / 0.05 = 0.8
    assert raw["small"] / (raw["small"] + 0.01) < 0.9


def test_multi_encoder_returns_raw_fds_and_weights_terms():
    d = 5
    refs = {"a": _reference(d, 1.0, seed=1), "b": _reference(d, 2.0, seed=2)}
    multi = MultiEncoderFDLoss(
        {n: FDLoss(r, EMAPopulation(d, beta=0.5)) for n, r in refs.items()}, weights={"a": 2.0}
    )
    assert multi.weights == {"a": 2.0, "b": 1.0}
    feats = {"a": torch.randn(8, d, dtype=torch.float64), "b": torch.randn(8, d, dtype=torch.float64) * 2 + 1}
    loss, raw = multi(feats)
    expected = sum(
        multi.weights[n] * raw[n] / (raw[n] + 1e-6 * float(refs[n].sigma.trace())) for n in refs
    )
    assert abs(float(loss.detach()) - expected) <= 1e-12 * expected
    assert set(raw) == {"a", "b"} and all(isinstance(v, float) for v in raw.values())
    assert "losses.a.population.mean" in multi.state_dict()


def test_multi_encoder_refuses_missing_or_unknown_encoders():
    d = 3
    multi = MultiEncoderFDLoss({"a": FDLoss(_reference(d, 1.0), EMAPopulation(d))})
    with pytest.raises(ValueError, match=r"missing \['a'\], unexpected \['b'\]"):
        multi({"b": torch.randn(4, d)})
    with pytest.raises(ValueError, match="weights given for unknown encoder"):
        MultiEncoderFDLoss({"a": FDLoss(_reference(d, 1.0), EMAPopulation(d))}, weights={"z": 1.0})
    with pytest.raises(ValueError, match="eps must be"):
        MultiEncoderFDLoss({"a": FDLoss(_reference(d, 1.0), EMAPopulation(d))}, eps=0.0)


def test_fd_loss_with_exact_population_gives_full_batch_gradient_with_one_eigh_per_step(monkeypatch):
    from fd_onestep.populations import ExactPopulation

    d, k = 6, 3
    ref = _reference(d, 1.0)
    torch.manual_seed(0)
    gen = torch.nn.Linear(8, d).double()  # full-rank features (see test_frechet for rank-deficient ones)
    noise = torch.randn(12, 8, dtype=torch.float64)
    feats = gen(noise)
    full = frechet_distance(ref.mu, ref.sigma, feats.mean(0), torch.cov(feats.T))
    full_grads = torch.autograd.grad(full, list(gen.parameters()))

    ref.sqrt_sigma  # the reference's own square root is computed once, outside the counted steps
    eigh_calls = []
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: eigh_calls.append(1) or real_eigh(m))
    loss_fn = FDLoss(ref, ExactPopulation(d, micro_batches=k))
    for _ in range(2):  # two steps: the cached gradient must not leak into the next step
        gen.zero_grad()
        loss_fn.population.begin_step()
        with torch.no_grad():
            for chunk in noise.chunk(k):
                loss_fn.population.accumulate(gen(chunk))
        for chunk in noise.chunk(k):
            loss = loss_fn(gen(chunk))
            loss.backward()
            assert abs(float(loss.detach()) - float(full.detach())) <= 1e-12 * float(full.detach())
        for p, gf in zip(gen.parameters(), full_grads):
            assert float((p.grad - gf).norm()) <= 1e-10 * float(gf.norm())
    assert len(eigh_calls) == 2  # once per step, not once per micro-batch
