"""Specification of the FD populations: EMA, queue and exact two-pass large batch."""

import numpy as np
import pytest
import torch

from fd_onestep.frechet import frechet_distance
from fd_onestep.populations import EMAPopulation, ExactPopulation, QueuePopulation, build_population
from fd_onestep.reference_stats import ReferenceStats


def _np_cov(x):
    return torch.from_numpy(np.cov(x.detach().double().numpy(), rowvar=False))


def test_ema_follows_the_raw_moment_formula_with_reliability_weight_correction():
    d, beta = 6, 0.9
    warm = torch.randn(200, d, dtype=torch.float64)
    batch = torch.randn(16, d, dtype=torch.float64) + 0.5
    pop = EMAPopulation(d, beta=beta)
    pop.warm_start(warm.split(64))
    mu, sigma = pop(batch)
    mu_t = beta * warm.mean(0) + (1 - beta) * batch.mean(0)
    e_t = beta * (warm.T @ warm) / 200 + (1 - beta) * (batch.T @ batch) / 16
    v2 = beta**2 / 200 + (1 - beta) ** 2 / 16
    assert torch.allclose(mu, mu_t, rtol=1e-13, atol=1e-15)
    assert torch.allclose(sigma, (e_t - torch.outer(mu_t, mu_t)) / (1 - v2), rtol=1e-12, atol=1e-14)
    assert torch.equal(pop.mean, mu.detach())  # the call advanced the EMA


def test_ema_warm_start_equals_numpy_cov_of_the_samples():
    x = torch.randn(300, 5, dtype=torch.float64) * 2
    pop = EMAPopulation(5)
    moments = pop.warm_start(x.split(70))
    assert moments.count == 300
    mu, sigma = pop.statistics()
    assert torch.allclose(sigma, _np_cov(x), rtol=1e-11, atol=1e-13)
    assert torch.allclose(mu, x.mean(0), rtol=1e-13, atol=1e-15)


def test_ema_with_beta_zero_is_the_unbiased_batch_covariance():
    pop = EMAPopulation(4, beta=0.0)
    pop.warm_start([torch.randn(50, 4)])
    batch = torch.randn(10, 4, dtype=torch.float64)
    _, sigma = pop(batch)
    assert torch.allclose(sigma, _np_cov(batch), rtol=1e-11, atol=1e-13)


def test_ema_gradient_flows_only_through_the_current_batch():
    pop = EMAPopulation(3, beta=0.99)
    pop.warm_start([torch.randn(100, 3)])
    batch = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    mu, _ = pop(batch)
    mu.sum().backward()
    assert torch.allclose(batch.grad, torch.full_like(batch, 0.01 / 8), rtol=1e-12)
    assert not pop.mean.requires_grad


def test_ema_update_false_does_not_advance():
    pop = EMAPopulation(3, beta=0.5)
    pop.warm_start([torch.randn(20, 3)])
    before = {k: v.clone() for k, v in pop.state_dict().items()}
    pop(torch.randn(4, 3), update=False)
    assert all(torch.equal(before[k], v) for k, v in pop.state_dict().items())


def test_queue_statistics_are_the_batch_plus_the_last_queue_size_samples():
    d, q = 4, 10
    pop = QueuePopulation(d, queue_size=q, storage_dtype=torch.float64)
    history = []
    for step in range(6):  # 6 batches of 3: the queue wraps around and evicts
        batch = torch.randn(3, d, dtype=torch.float64) + step
        mu, sigma = pop(batch)
        population = torch.cat([batch] + ([torch.cat(history)[-q:]] if history else []))
        assert torch.allclose(mu, population.mean(0), rtol=1e-12, atol=1e-12)
        assert torch.allclose(sigma, _np_cov(population), rtol=1e-10, atol=1e-11)
        history.append(batch)
    assert int(pop.filled) == q
    stored = torch.cat(history)[-q:]
    assert torch.allclose(pop.sum_outer, stored.T @ stored, rtol=1e-12)
    assert sorted(map(tuple, pop.features.tolist())) == sorted(map(tuple, stored.tolist()))


def test_queue_warm_start_keeps_only_the_last_samples():
    pop = QueuePopulation(3, queue_size=5, storage_dtype=torch.float64)
    x = torch.randn(12, 3, dtype=torch.float64)
    pop.warm_start(x.split(4))
    mu, sigma = pop.statistics()
    assert torch.allclose(sigma, _np_cov(x[-5:]), rtol=1e-11, atol=1e-12)


def _tiny_generator(d_in, d, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, 32), torch.nn.Tanh(), torch.nn.Linear(32, d)).double()


def test_exact_population_summed_gradient_equals_full_batch_gradient():
    d, k, b = 8, 4, 6
    g = torch.Generator().manual_seed(0)
    ref = ReferenceStats.from_features(torch.randn(500, d, generator=g, dtype=torch.float64) * 1.5 + 0.3)
    gen = _tiny_generator(5, d)
    noise = torch.randn(k * b, 5, generator=g, dtype=torch.float64)

    # full batch, one pass
    feats = gen(noise)
    full = frechet_distance(ref.mu, ref.sigma, feats.mean(0), torch.cov(feats.T))
    full_grads = torch.autograd.grad(full, list(gen.parameters()))

    exact = ExactPopulation(d, micro_batches=k)
    exact.begin_step()
    with torch.no_grad():
        for chunk in noise.chunk(k):
            exact.accumulate(gen(chunk))
    gen.zero_grad()
    values = []
    for chunk in noise.chunk(k):  # one micro-batch's activations at a time
        mu, sigma = exact(gen(chunk))
        loss = ref.frechet_distance(mu, sigma)
        loss.backward()
        values.append(float(loss.detach()))
    for v in values:
        assert abs(v - float(full.detach())) <= 1e-12 * float(full.detach())
    for p, gf in zip(gen.parameters(), full_grads):
        assert float((p.grad - gf).norm()) <= 1e-10 * float(gf.norm())


def test_exact_population_distance_is_the_fd_of_the_large_batch_for_each_reference():
    d, k = 5, 2
    g = torch.Generator().manual_seed(1)
    refs = [ReferenceStats.from_features(torch.randn(400, d, generator=g, dtype=torch.float64) * s) for s in (1.0, 2.0)]
    gen = _tiny_generator(6, d)
    noise = torch.randn(4 * k, 6, generator=g, dtype=torch.float64)
    exact = ExactPopulation(d, micro_batches=k)
    assert exact.two_pass and not EMAPopulation(d).two_pass and not QueuePopulation(d, 4).two_pass
    exact.begin_step()
    with torch.no_grad():
        for chunk in noise.chunk(k):
            exact.accumulate(gen(chunk))
    exact.end_accumulation()
    feats = gen(noise).detach()
    for chunk in noise.chunk(k):
        mu, sigma = exact(gen(chunk))
        for ref in refs:  # alternating references: the cached F(M) and gradient belong to one reference
            expected = frechet_distance(ref.mu, ref.sigma, feats.mean(0), torch.cov(feats.T))
            value = exact.distance(ref, mu, sigma)
            assert value.requires_grad
            assert abs(float(value.detach()) - float(expected)) <= 1e-12 * float(expected)
    with torch.no_grad():  # statistics without gradient: the plain distance
        mu, sigma = exact.statistics()
        assert torch.equal(exact.distance(refs[0], mu, sigma), refs[0].frechet_distance(mu, sigma))


def test_exact_population_accepts_precomputed_pass_one_moments():
    d = 5
    x = torch.randn(20, d, dtype=torch.float64)
    total = ExactPopulation.micro_batch_moments(x[:10]).merge(ExactPopulation.micro_batch_moments(x[10:]))
    exact = ExactPopulation(d)
    exact.begin_step(total)
    mu, sigma = exact(x[:10])
    assert torch.allclose(sigma, _np_cov(x), rtol=1e-11, atol=1e-12)
    assert torch.allclose(mu, x.mean(0), rtol=1e-13, atol=1e-14)


def test_exact_population_refuses_loop_mistakes():
    exact = ExactPopulation(3, micro_batches=2)
    exact.begin_step()
    with pytest.raises(RuntimeError, match="run pass 1"):
        exact(torch.randn(4, 3))
    exact.begin_step()
    x = torch.randn(8, 3)
    for chunk in x.chunk(2):
        exact.accumulate(chunk)
    for chunk in x.chunk(2):
        exact(chunk)
    with pytest.raises(RuntimeError, match="micro_batches=2"):
        exact(x[:4])
    with pytest.raises(RuntimeError, match="call begin_step"):
        exact.accumulate(x)
    with pytest.raises(ValueError, match="cannot be warm-started"):
        exact.warm_start([x])
    assert not exact.supports_warm_start


@pytest.mark.parametrize("kind,kwargs", [("ema", {"beta": 0.8}), ("queue", {"queue_size": 7, "storage_dtype": torch.float64})])
def test_state_dict_round_trip_resumes_identically(kind, kwargs, tmp_path):
    d = 4
    batches = [torch.randn(3, d, dtype=torch.float64) for _ in range(6)]
    pop = build_population(kind, d, **kwargs)
    pop.warm_start([torch.randn(10, d)])
    for batch in batches[:3]:
        pop(batch)
    state = pop.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.save(state, tmp_path / "population.pt")
    resumed = build_population(kind, d, **kwargs)
    resumed.load_state_dict(torch.load(tmp_path / "population.pt", weights_only=True))
    for batch in batches[3:]:
        a, b = pop(batch), resumed(batch)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_exact_state_dict_resumes_mid_step(tmp_path):
    x = torch.randn(12, 3, dtype=torch.float64)
    exact = ExactPopulation(3, micro_batches=3)
    exact.begin_step()
    for chunk in x.chunk(3):
        exact.accumulate(chunk)
    exact(x[:4])
    resumed = ExactPopulation(3, micro_batches=3)
    resumed.load_state_dict(exact.state_dict())
    a, b = exact(x[4:8]), resumed(x[4:8])
    assert torch.equal(a[1], b[1])


def test_build_population_rejects_unknown_kind_and_bad_arguments():
    assert isinstance(build_population("EMA", 3), EMAPopulation)
    with pytest.raises(ValueError, match="unknown population kind 'fifo'.*'queue'"):
        build_population("fifo", 3)
    with pytest.raises(TypeError, match="bad arguments for population 'queue'"):
        build_population("queue", 3)
    with pytest.raises(ValueError, match="beta must be in"):
        EMAPopulation(3, beta=1.0)


def test_population_rejects_bad_features():
    pop = EMAPopulation(3)
    with pytest.raises(ValueError, match="dimension 5 but 3"):
        pop(torch.randn(4, 5))
    bad = torch.randn(4, 3)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pop(bad)
    with pytest.raises(ValueError, match="at least 2 samples"):
        pop(torch.randn(1, 3))
