"""`fd-onestep stats` under `accelerate launch` with 2 CPU processes equals one process."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fd_onestep.encoders.testing import save_tiny_siglip
from fd_onestep.reference_stats import ReferenceStats

pytestmark = pytest.mark.distributed


def _env():
    env = dict(os.environ)
    # One thread per process: identical float32 kernels in both runs, and fair to the shared cores.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", ACCELERATE_CONFIG_FILE=os.devnull)
    return env


def _stats_command(data, model, out):
    # 16 images, batch 4: one process reads 4 batches, each of 2 processes reads 2 of the same batches.
    return ["stats", "--encoders", str(model), "--dataset", str(data), "--split", "train",
            "--batch_size", "4", "--output_dir", str(out)]


def test_two_process_accelerate_launch_gives_the_same_stats_as_one_process(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{i:02d}.png")
    model = save_tiny_siglip(tmp_path / "tiny-siglip")

    single = subprocess.run([sys.executable, "-m", "fd_onestep.cli", *_stats_command(tmp_path / "data", model, tmp_path / "one")],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "computed by 1 process(es)" in single.stdout

    multi = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fd_onestep.cli",
         *_stats_command(tmp_path / "data", model, tmp_path / "two")],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "computed by 2 process(es)" in multi.stdout  # really two processes, not a silent fallback to one

    one = ReferenceStats.load(tmp_path / "one" / "tiny-siglip.safetensors")
    two = ReferenceStats.load(tmp_path / "two" / "tiny-siglip.safetensors")
    assert one.num_samples == two.num_samples == 16
    for a, b in ((one.mu, two.mu), (one.sigma, two.sigma)):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-10
    assert not torch.equal(one.sigma, torch.zeros_like(one.sigma))


def _skip_worker(rank, world, init_file, folder, out_dir):
    import torch.distributed as dist

    from fd_onestep.dataset_stats import compute_reference_stats
    from fd_onestep.encoders import load_encoder

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stats = compute_reference_stats({"pixels": load_encoder("pixels:4")}, images_dir=folder, batch_size=2,
                                        skip_unreadable=True, show_progress=False)["pixels"]
        torch.save({"num_samples": stats.num_samples, "skipped": stats.metadata["skipped_unreadable_images"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_skipped_unreadable_images_are_counted_over_all_processes(tmp_path):
    import torch.multiprocessing as mp

    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    for i in (1, 6):  # one in each process's shard (files 0-3 and 4-7)
        data = (folder / f"{i:02d}.png").read_bytes()
        (folder / f"{i:02d}.png").write_bytes(data[: len(data) // 2])
    mp.spawn(_skip_worker, args=(2, str(tmp_path / "rendezvous"), str(folder), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        assert torch.load(tmp_path / f"rank{r}.pt") == {"num_samples": 6, "skipped": "2"}
