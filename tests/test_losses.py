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


def _features(gen, chunk):
    feats = gen(chunk)
    return {"a": feats, "b": feats * 0.1}


def _generic_step(fd_loss, gen, noise, k):
    """One optimizer step through the loss-level step protocol only (no population internals)."""
    micro = noise.chunk(k) if fd_loss.two_pass else [noise]
    fd_loss.begin_step()
    if fd_loss.two_pass:
        with torch.no_grad():
            for chunk in micro:
                fd_loss.accumulate(_features(gen, chunk))
    fd_loss.end_accumulation()
    raws = []
    for chunk in micro:
        loss, raw = fd_loss(_features(gen, chunk))
        loss.backward()
        raws.append(raw)
    return raws


def _kind_specific_step(fd_loss, gen, noise, k, kind):
    """The same step written against the populations themselves."""
    if kind != "exact":
        loss, raw = fd_loss(_features(gen, noise))
        loss.backward()
        return [raw]
    populations = {name: loss.population for name, loss in fd_loss.losses.items()}
    for population in populations.values():
        population.begin_step()
    with torch.no_grad():
        for chunk in noise.chunk(k):
            for name, f in _features(gen, chunk).items():
                populations[name].accumulate(f)
    raws = []
    for chunk in noise.chunk(k):
        loss, raw = fd_loss(_features(gen, chunk))
        loss.backward()
        raws.append(raw)
    return raws


@pytest.mark.parametrize("kind", ["ema", "queue", "exact"])
def test_multi_encoder_step_protocol_runs_every_population_kind_generically(kind):
    from fd_onestep.populations import build_population

    d, k = 5, 3
    kwargs = {"ema": {"beta": 0.5}, "queue": {"queue_size": 20, "storage_dtype": torch.float64},
              "exact": {"micro_batches": k}}[kind]
    refs = {"a": _reference(d, 1.0, seed=1), "b": _reference(d, 0.1, seed=2)}

    def build():
        return MultiEncoderFDLoss({n: FDLoss(r, build_population(kind, d, **kwargs)) for n, r in refs.items()},
                                  weights={"a": 2.0})

    generic, specific = build(), build()
    assert generic.two_pass == (kind == "exact")
    assert all(loss.two_pass == (kind == "exact") for loss in generic.losses.values())
    torch.manual_seed(0)
    gen = torch.nn.Linear(8, d).double()  # full-rank features (see test_frechet for rank-deficient ones)
    noise = torch.randn(12, 8, dtype=torch.float64)
    if not generic.two_pass:  # pass-1 calls are no-ops: they leave a one-pass population untouched
        before = {key: v.clone() for key, v in generic.state_dict().items()}
        generic.begin_step()
        generic.accumulate(_features(gen, noise))
        generic.end_accumulation()
        assert all(torch.equal(before[key], v) for key, v in generic.state_dict().items())
    for step in range(2):
        results = []
        for fd_loss, run in ((generic, _generic_step), (specific, _kind_specific_step)):
            gen.zero_grad()
            raws = run(fd_loss, gen, noise, k) if run is _generic_step else run(fd_loss, gen, noise, k, kind)
            results.append((raws, [p.grad.clone() for p in gen.parameters()]))
        (raws, grads), (raws_specific, grads_specific) = results
        assert raws == raws_specific and all(torch.equal(a, b) for a, b in zip(grads, grads_specific))
        if kind == "exact":  # every micro-batch sees the large batch's FD; the gradients add up to its own
            assert len(raws) == k and all(r == raws[0] for r in raws)
            feats = _features(gen, noise)
            full = sum(
                generic.weights[n] * frechet_distance(refs[n].mu, refs[n].sigma, f.mean(0), torch.cov(f.T))
                / (raws[0][n] + generic.eps_for(n))
                for n, f in feats.items()
            )
            for p, g in zip(gen.parameters(), torch.autograd.grad(full, list(gen.parameters()))):
                assert float((p.grad - g).norm()) <= 1e-10 * float(g.norm()), step
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        generic.accumulate({"a": gen(noise)})
    with pytest.raises(ValueError, match="dimension 3 but 5 was expected"):  # checked in pass 1 too
        generic.accumulate({"a": torch.randn(4, 3), "b": torch.randn(4, d)})


def test_fd_loss_takes_the_fd_from_the_population_distance_hook():
    calls = []

    class Doubling(EMAPopulation):
        def distance(self, reference, mu, sigma):
            calls.append(1)
            return 2 * super().distance(reference, mu, sigma)

    ref = _reference(4, 1.0)
    feats = torch.randn(8, 4, dtype=torch.float64)
    plain = FDLoss(ref, EMAPopulation(4, beta=0.5))(feats)
    doubled = FDLoss(ref, Doubling(4, beta=0.5))(feats)
    assert calls == [1] and torch.equal(doubled, 2 * plain)


def test_weighted_fd_is_the_weighted_sum_of_the_raw_fds_while_the_loss_is_the_sum_of_weights():
    d = 4
    refs = {"a": _reference(d, 1.0, seed=1), "b": _reference(d, 3.0, seed=2)}
    multi = MultiEncoderFDLoss({n: FDLoss(r, EMAPopulation(d, beta=0.5)) for n, r in refs.items()},
                               weights={"a": 2.0, "b": 0.5})
    loss, raw = multi({"a": torch.randn(16, d, dtype=torch.float64) + 1, "b": torch.randn(16, d, dtype=torch.float64)})
    assert multi.weighted_fd(raw) == 2.0 * raw["a"] + 0.5 * raw["b"]
    assert multi.weighted_fd({"a": 1.0, "b": 4.0}) == 4.0
    assert abs(float(loss.detach()) - 2.5) <= 1e-4 * 2.5  # uninformative: about sum_i w_i at every step
    with pytest.raises(ValueError, match=r"raw FDs are for encoders \['a'\].*missing \['b'\]"):
        multi.weighted_fd({"a": 1.0})


@pytest.mark.parametrize("kind", ["ema", "queue"])
def test_multi_encoder_end_step_advances_every_population_once_per_step_of_k_micro_batches(kind):
    from fd_onestep.populations import build_population

    d, k = 4, 3
    kwargs = {"ema": {"beta": 0.5}, "queue": {"queue_size": 30, "storage_dtype": torch.float64}}[kind]
    refs = {"a": _reference(d, 1.0, seed=1), "b": _reference(d, 0.1, seed=2)}
    multi = MultiEncoderFDLoss({n: FDLoss(r, build_population(kind, d, **kwargs)) for n, r in refs.items()})
    twins = {n: build_population(kind, d, **kwargs) for n in refs}
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        micro = [torch.randn(4, d, generator=g, dtype=torch.float64) for _ in range(k)]
        multi.begin_step()
        for m in micro:
            multi({"a": m, "b": 0.1 * m})
        multi.end_step()
        for name, scale in (("a", 1.0), ("b", 0.1)):
            twins[name](scale * torch.cat(micro))
    for name, loss in multi.losses.items():
        population, twin = loss.population, twins[name]
        if kind == "ema":
            assert int(population.num_updates) == 2
        else:
            assert int(population.filled) == 2 * k * 4
        for key, value in twin.state_dict().items():
            assert torch.allclose(population.state_dict()[key], value, rtol=1e-13, atol=1e-15), key


def test_multi_encoder_end_step_runs_the_exact_populations_pass_two_check():
    from fd_onestep.populations import ExactPopulation

    d = 4
    multi = MultiEncoderFDLoss({"a": FDLoss(_reference(d, 1.0), ExactPopulation(d, micro_batches=2))})
    x = torch.randn(8, d, dtype=torch.float64)
    multi.begin_step()
    for chunk in x.chunk(2):
        multi.accumulate({"a": chunk})
    multi.end_accumulation()
    for chunk in x.chunk(2):
        multi({"a": (chunk * 1.001).requires_grad_()})  # not the features of pass 1
    with pytest.raises(RuntimeError, match="pass 2 features differ from pass 1"):
        multi.end_step()
