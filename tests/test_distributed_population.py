"""Two real processes (CPU, gloo, DDP) with batch b each == one process with batch 2b.

For every population kind the FD-loss value and the DDP-averaged parameter gradient of a tiny
generator must equal the single-process run on the concatenated batch, over several optimizer steps
(so the populations' state advances identically too), also with two micro-batches per step for the
one-pass kinds (gradient accumulation: the step protocol's begin_step/end_step), and the exact
population's end_step check of pass 2 against pass 1 runs its collective. The joint FD-loss (features with
their labels' embedding, "<kind>/joint") is held to the same equality for every population kind.
"""

import contextlib
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from fd_onestep.conditioning_metrics import ClassConditionalMoments, ClassConditionalStats, LabelEmbedding
from fd_onestep.losses import FDLoss
from fd_onestep.populations import build_population
from fd_onestep.reference_stats import ReferenceStats

D, D_IN, B, STEPS, WARM_CHUNKS, C = 6, 4, 8, 3, 3, 3
KINDS = {
    "ema": {"beta": 0.7},
    "queue": {"queue_size": 20, "storage_dtype": torch.float64},
    "exact": {"micro_batches": 2},
}
# name -> (population kind, micro-batches per optimizer step)
RUNS = {"ema": ("ema", 1), "queue": ("queue", 1), "exact": ("exact", 2),
        "ema/accumulate": ("ema", 2), "queue/accumulate": ("queue", 2),
        "ema/joint": ("ema", 1), "queue/joint": ("queue", 2), "exact/joint": ("exact", 2)}


def _data():
    g = torch.Generator().manual_seed(123)
    reference = torch.randn(300, D, generator=g, dtype=torch.float64) * 1.3 + 0.4
    steps = [torch.randn(2 * B, D_IN, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    warm = [torch.randn(2 * 5, D, generator=g, dtype=torch.float64) for _ in range(WARM_CHUNKS)]
    return ReferenceStats.from_features(reference, encoder_id="toy"), steps, warm


def _joint_data():
    """Labeled reference features (class c shifted along axis c), step and warm-start labels."""
    g = torch.Generator().manual_seed(321)
    labels = torch.arange(300) % C
    reference = torch.randn(300, D, generator=g, dtype=torch.float64)
    reference[torch.arange(300), labels] += 1.5
    stats = ClassConditionalStats.from_moments(ClassConditionalMoments(D, C).update(reference, labels))
    step_labels = [torch.randint(0, C, (2 * B,), generator=g) for _ in range(STEPS)]
    warm_labels = [torch.randint(0, C, (2 * 5,), generator=g) for _ in range(WARM_CHUNKS)]
    return stats, step_labels, warm_labels


def _run(run, world, rank):
    """Train STEPS SGD steps; return [(loss, [param grads])] (grads after DDP averaging)."""
    kind, k = RUNS[run]
    joint = run.endswith("/joint")
    reference, steps, warm = _data()
    stats, step_labels, warm_labels = _joint_data()
    if not joint:  # the marginal loss takes no labels
        step_labels = [None] * STEPS
        warm_labels = None
    torch.manual_seed(0)
    generator = torch.nn.Sequential(torch.nn.Linear(D_IN, D), torch.nn.Tanh(), torch.nn.Linear(D, D)).double()
    model = DistributedDataParallel(generator) if world > 1 else generator
    if joint:
        embedding = LabelEmbedding(C, 0.8 * stats.alpha)
        population = build_population(kind, D + C, **KINDS[kind])
        loss_fn = FDLoss(stats.joint_reference_at(embedding.alpha), population, label_embedding=embedding)
    else:
        population = build_population(kind, D, **KINDS[kind])
        loss_fn = FDLoss(reference, population)
    assert loss_fn.two_pass == (kind == "exact")
    if population.supports_warm_start:
        loss_fn.warm_start([chunk.chunk(world)[rank] for chunk in warm],
                           None if warm_labels is None else [l.chunk(world)[rank] for l in warm_labels])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for noise, labels in zip(steps, step_labels):
        optimizer.zero_grad()
        # the loss-level step protocol, the same code for every population kind; micro-batch i of the
        # step is the same global batch in both runs (this process's rows of it)
        micro = [m.chunk(world)[rank] for m in noise.chunk(k)]
        micro_labels = [None] * k if labels is None else [l.chunk(world)[rank] for l in labels.chunk(k)]
        loss_fn.begin_step()
        if loss_fn.two_pass:
            with torch.no_grad():
                for m, l in zip(micro, micro_labels):
                    loss_fn.accumulate(model(m), l)
        loss_fn.end_accumulation()  # collective for the exact population
        for i, (m, l) in enumerate(zip(micro, micro_labels)):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if (last or world == 1) else model.no_sync():
                loss = loss_fn(model(m), l)
                loss.backward()
        loss_fn.end_step()  # one-pass: advance once with the step's micro-batches; exact: check (collective)
        history.append((float(loss.detach()), [p.grad.detach().clone() for p in model.parameters()]))
        optimizer.step()
    return history


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {run: _run(run, world, rank) for run in RUNS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_with_the_doubled_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for run in RUNS:
        single = _run(run, world=1, rank=0)
        for step, (loss_1, grads_1) in enumerate(single):
            for r in range(2):
                loss_2, grads_2 = ranks[r][run][step]
                assert abs(loss_2 - loss_1) <= 1e-10 * abs(loss_1), (run, step, r)
                for g2, g1 in zip(grads_2, grads_1):
                    assert float((g2 - g1).norm()) <= 1e-9 * float(g1.norm()), (run, step, r)
