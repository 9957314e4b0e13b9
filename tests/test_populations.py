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


# ------------------------------------------------------------------ gradient accumulation (step protocol)


def _ema_state(pop):
    return pop.mean, pop.second_moment, pop.sum_sq_weights


def _accumulated_step(pop, twin, micro):
    """One step of ``pop`` over the micro-batches; ``twin`` (holding the state of the start of the step) sees
    each micro-batch without updating, then takes them all as one batch (one update)."""
    pop.begin_step()
    for m in micro:
        # each micro-batch: the population of the start of the step plus its own batch
        expected = twin(m, update=False)
        got = pop(m)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    pop.end_step()
    twin(torch.cat(micro))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_ema_advances_once_per_step_as_one_update_with_the_concatenated_micro_batches(k):
    d, b = 5, 6
    g = torch.Generator().manual_seed(3)
    warm = torch.randn(40, d, generator=g, dtype=torch.float64)
    pop, twin = EMAPopulation(d, beta=0.7), EMAPopulation(d, beta=0.7)
    pop.warm_start([warm])
    twin.warm_start([warm])
    for step in range(3):
        micro = [torch.randn(b, d, generator=g, dtype=torch.float64) + step for _ in range(k)]
        twin.load_state_dict(pop.state_dict())  # the population of the start of the step
        _accumulated_step(pop, twin, micro)  # the twin: one update with the step's k * b samples
        assert int(pop.num_updates) == 2 + step  # warm start, then one per optimizer step: 2, 3, 4
        for a, e in zip(_ema_state(pop), _ema_state(twin)):
            assert torch.allclose(a, e, rtol=1e-13, atol=1e-15)
        assert float(pop.sum_sq_weights) == float(twin.sum_sq_weights)


def test_ema_without_warm_start_initializes_from_the_first_steps_micro_batches():
    d = 3
    x = torch.randn(8, d, dtype=torch.float64)
    pop = EMAPopulation(d, beta=0.9)
    pop.begin_step()
    pop(x[:4])
    pop(x[4:])
    assert pop.is_empty  # nothing advances inside the step
    pop.end_step()
    mu, sigma = pop.statistics()
    assert int(pop.num_updates) == 1
    assert torch.allclose(mu, x.mean(0), rtol=1e-13) and torch.allclose(sigma, _np_cov(x), rtol=1e-11, atol=1e-13)


def test_queue_pushes_all_micro_batches_of_a_step_at_its_end():
    d, q = 3, 10
    g = torch.Generator().manual_seed(4)
    pop = QueuePopulation(d, queue_size=q, storage_dtype=torch.float64)
    twin = QueuePopulation(d, queue_size=q, storage_dtype=torch.float64)
    for step in range(4):  # 4 steps of 2 x 3 samples: the ring wraps around
        micro = [torch.randn(3, d, generator=g, dtype=torch.float64) for _ in range(2)]
        _accumulated_step(pop, twin, micro)
        assert all(torch.equal(a, b) for a, b in zip(pop.state_dict().values(), twin.state_dict().values()))


def test_begin_step_ends_a_step_left_open_and_update_false_is_not_recorded():
    d = 3
    pop, twin = EMAPopulation(d, beta=0.5), EMAPopulation(d, beta=0.5)
    x = torch.randn(6, d, dtype=torch.float64)
    pop.begin_step()
    pop(x)
    pop(x + 1, update=False)  # a side evaluation
    pop.begin_step()  # the open step ends first
    twin(x)
    assert int(pop.num_updates) == 1 and torch.equal(pop.mean, twin.mean)
    pop.end_step()  # a step with no update: nothing advances
    pop.end_step()  # no step open: no-op
    assert int(pop.num_updates) == 1 and not pop.in_step


# ------------------------------------------------------------------ exact population self-check


class _Encoder(torch.nn.Module):
    """A small encoder on generated 'images' (B, 6) -> features (B, 4)."""

    def __init__(self, dropout=0.0, cast_to_float=True):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                                       torch.nn.Linear(16, 4))
        self.cast_to_float = cast_to_float

    def forward(self, x):
        out = self.net(x)
        return out.float() if self.cast_to_float else out


def _exact_step(encoder, noise, k, *, autocast_pass1=False, autocast_pass2=False, end=True, pop=None, **kwargs):
    gen = torch.nn.Linear(5, 6)
    torch.manual_seed(0)
    torch.nn.init.normal_(gen.weight)
    pop = pop or ExactPopulation(4, micro_batches=k, **kwargs)

    def features(chunk, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return encoder(gen(chunk))

    pop.begin_step()
    with torch.no_grad():
        for chunk in noise.chunk(k):
            pop.accumulate(features(chunk, autocast_pass1))
    pop.end_accumulation()
    for chunk in noise.chunk(k):
        mu, sigma = pop(features(chunk, autocast_pass2))
        (mu.sum() + sigma.sum()).backward()
    if end:
        pop.end_step()
    return pop


@pytest.mark.parametrize("bf16", [False, True])
def test_exact_population_accepts_pass_two_when_it_recomputes_pass_one_bitwise(bf16):
    noise = torch.randn(12, 5)
    # float32 features, or bf16 features (the encoder's output under bf16 autocast in both passes)
    pop = _exact_step(_Encoder(cast_to_float=not bf16), noise, 3, autocast_pass1=bf16, autocast_pass2=bf16)
    assert not pop.in_step


def test_exact_population_refuses_autocast_in_pass_one_only():
    noise = torch.randn(12, 5)
    # float32 features both times, but pass 1 ran the encoder in bf16: the sums differ
    with pytest.raises(RuntimeError, match=r"pass 2 features differ from pass 1 .*bitwise equality \(CPU\).*autocast"):
        _exact_step(_Encoder(), noise, 3, autocast_pass1=True)
    # bf16 features in pass 1, float32 in pass 2
    with pytest.raises(RuntimeError, match="pass-1 features are bfloat16 but the pass-2 features float32.*autocast"):
        _exact_step(_Encoder(cast_to_float=False), noise, 3, autocast_pass1=True)


def test_exact_population_refuses_dropout_between_the_passes():
    encoder = _Encoder(dropout=0.5).train()  # train-mode dropout draws other masks in pass 2
    with pytest.raises(RuntimeError, match="pass 2 features differ from pass 1.*dropout"):
        _exact_step(encoder, torch.randn(12, 5), 2)


def test_exact_population_refuses_a_pass_two_that_skipped_micro_batches():
    pop = ExactPopulation(3)
    x = torch.randn(8, 3)
    pop.begin_step()
    for chunk in x.chunk(2):
        pop.accumulate(chunk)
    pop(x[:4])
    with pytest.raises(RuntimeError, match="pass 2 saw 4 samples but pass 1 8"):
        pop.end_step()


def test_a_step_left_open_is_checked_by_the_next_begin_step():
    pop = _exact_step(_Encoder(), torch.randn(8, 5), 2, autocast_pass1=True, end=False)
    with pytest.raises(RuntimeError, match="pass 2 features differ from pass 1"):
        pop.begin_step()
    pop.begin_step()  # checked once: the next step starts clean


def test_exact_population_tolerance_off_the_cpu_and_its_override():
    from fd_onestep.populations import PASS2_RTOL, pass2_tolerance

    assert pass2_tolerance(torch.device("cpu"), torch.bfloat16) == 0.0
    assert pass2_tolerance(torch.device("cuda"), torch.float32) == PASS2_RTOL[torch.float32] == 1e-4
    assert pass2_tolerance(torch.device("cuda"), torch.bfloat16) == PASS2_RTOL[torch.bfloat16]
    x = torch.randn(8, 3, dtype=torch.float64)

    def step(pass2_features, **kwargs):
        pop = ExactPopulation(3, **kwargs)
        pop.begin_step()
        pop.accumulate(x)
        pop(pass2_features)
        pop.end_step()

    nudged = x * (1 + 1e-7)  # the round-off of a non-deterministic kernel, say
    step(nudged, pass2_rtol=1e-4)
    with pytest.raises(RuntimeError, match="bitwise equality"):
        step(nudged)
    # 1% on the features is 2% on E[zz^T]
    with pytest.raises(RuntimeError, match=r"deviation of their sums 2\.0[0-9]+e-02; tolerance 1\.0e-04"):
        step(x * 1.01, pass2_rtol=1e-4)
    with pytest.raises(ValueError, match="pass2_rtol"):
        ExactPopulation(3, pass2_rtol=-1.0)
