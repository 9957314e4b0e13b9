"""Every tensor handed to a collective lives on the process's device.

``accelerate launch --multi_gpu`` starts an NCCL process group, which takes CUDA tensors only, and on a GPU
node a tensor created without ``device=`` lands on the CPU. The populations and moments are therefore
created on the process's device (``device=``) and follow the device of their features.

Stand-in for a GPU on this CPU-only machine. Meta tensors cannot play the process's device here: every
reduction reads its result back on the host (the global sample count of ``FeatureMoments.all_reduce`` and
of a population's batch, the row counts of ``all_gather_cat``, the exact population's verdict), and so does
the finiteness check of the features, which meta tensors (no values) cannot do. So the two roles are
swapped: the process's device is the CPU, and torch's default device is ``meta`` (``with
torch.device("meta")``), so that anything created without an explicit device lands on meta, as it lands on
the CPU on a GPU node. ``torch.distributed`` is faked as a world of 2 whose collectives record the device of
every tensor they get and refuse any other device than the process's (the values are left alone: as if the
other process contributed zeros to a sum and the same rows to a gather).
"""

import pytest
import torch

import fd_onestep.distributed as distributed
from fd_onestep.dataset_stats import accumulate_moments
from fd_onestep.encoders import load_encoder
from fd_onestep.moments import FeatureMoments
from fd_onestep.populations import build_population

PROCESS_DEVICE = torch.device("cpu")
D = 4
KWARGS = {"ema": {"beta": 0.5}, "queue": {"queue_size": 6, "storage_dtype": torch.float64},
          "exact": {"micro_batches": 2}}


@pytest.fixture
def collectives(monkeypatch):
    """Fake a 2-process group; returns the devices of the tensors every collective received."""
    seen = []

    def receive(tensor):
        seen.append(tensor.device)
        if tensor.device != PROCESS_DEVICE:
            raise AssertionError(f"a collective got a tensor on {tensor.device}, not on the process's device")

    def all_reduce(tensor, op=None, group=None, async_op=False):
        receive(tensor)

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        receive(tensor)
        for out in tensor_list:
            receive(out)
            out.copy_(tensor)

    monkeypatch.setattr(distributed, "_initialized", lambda: True)
    monkeypatch.setattr(distributed, "_backend", lambda: "stand-in", raising=False)  # NCCL guard: below
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    return seen


def _features(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64, device=PROCESS_DEVICE)


def _on_process_device(population):
    return all(b.device == PROCESS_DEVICE for b in population.buffers())


def test_feature_moments_reduce_on_the_device_of_their_features(collectives):
    with torch.device("meta"):
        lazy = FeatureMoments(D).update(_features(8, 0)).all_reduce()  # no device=: the features' device
        placed = FeatureMoments(D, device=PROCESS_DEVICE).all_reduce()  # no data at all: its own device
    assert len(collectives) == 2 and set(collectives) == {PROCESS_DEVICE}
    assert lazy.count == 8 and lazy.sum.device == PROCESS_DEVICE and placed.sum.device == PROCESS_DEVICE


def test_ema_warm_start_reduces_on_the_device_of_its_features(collectives):
    # (a population left on another device follows its features first; that move cannot be staged
    # here: nothing can be copied out of a meta tensor)
    with torch.device("meta"):
        population = build_population("ema", D, device=PROCESS_DEVICE, **KWARGS["ema"])
        population.warm_start(_features(5, seed) for seed in range(3))
    assert collectives and set(collectives) == {PROCESS_DEVICE}
    assert _on_process_device(population) and int(population.num_updates) == 1


@pytest.mark.parametrize("kind", ["ema", "queue", "exact"])
def test_each_population_is_created_and_reduces_on_the_process_device(collectives, kind):
    with torch.device("meta"):
        population = build_population(kind, D, device=PROCESS_DEVICE, **KWARGS[kind])
        assert _on_process_device(population)  # created there, not moved there by the first call
        micro = [_features(4, 10), _features(4, 11)]
        population.begin_step()
        if population.two_pass:
            for f in micro:
                population.accumulate(f)
            population.end_accumulation()
            assert collectives == [PROCESS_DEVICE]  # pass 1's reduction
        for f in micro:
            mu, sigma = population(f.requires_grad_())
            assert mu.device == sigma.device == PROCESS_DEVICE
        population.end_step()  # exact: the pass-2 check's verdicts are reduced too
        if not population.two_pass:
            population(_features(4, 12))  # outside a step: one call per optimizer step
    assert len(collectives) >= 2 and set(collectives) == {PROCESS_DEVICE}
    assert _on_process_device(population)


def test_exact_end_accumulation_reduces_on_the_process_device(collectives):
    with torch.device("meta"):
        population = build_population("exact", D, device=PROCESS_DEVICE)
        population.begin_step()
        population.accumulate(_features(6, 0))
        population.end_accumulation()
    assert collectives == [PROCESS_DEVICE]


def test_accumulate_moments_reduces_on_the_device_of_the_encoders(collectives):
    encoders = {"pixels": load_encoder("pixels-gray:4", device=PROCESS_DEVICE)}
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(3, 1, 8, 8, generator=g) * 2 - 1 for _ in range(2)]
    with torch.device("meta"):
        moments = accumulate_moments(batches, encoders, show_progress=False)
    assert collectives == [PROCESS_DEVICE]
    assert moments["pixels"].count == 6 and moments["pixels"].sum.device == PROCESS_DEVICE


def test_a_cpu_tensor_handed_to_nccl_is_refused_naming_the_fix(collectives, monkeypatch):
    monkeypatch.setattr(distributed, "_backend", lambda: "nccl")
    with pytest.raises(RuntimeError, match=r"cpu tensor was handed to an NCCL collective.*device=accelerator\.device"):
        distributed.all_reduce_sum(torch.zeros(3))
    with pytest.raises(RuntimeError, match="NCCL"):
        distributed.all_gather_cat(torch.zeros(2, 3))
    assert collectives == []  # refused before the collective
