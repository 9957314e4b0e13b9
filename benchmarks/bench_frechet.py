"""Benchmark of the Fréchet-distance core against its peers, printed as markdown tables.

    python benchmarks/bench_frechet.py            # d = 768, 1152, 2048 (several minutes on 2 cores)
    python benchmarks/bench_frechet.py --quick    # small d, seconds: a smoke run

Everything is measured with ``torch.set_num_threads(--threads)`` (default 2) as ratios against a peer
in the same run (best of --repeats; peers interleaved with ours so machine contention hits both):

1. FD value: ours (reference factor cached, ``eigvalsh`` of F^T S_q F) vs pytorch-fid's
   ``calculate_frechet_distance`` (scipy ``sqrtm``) and torchmetrics' ``_compute_fid`` (non-symmetric
   ``eigvals``), with the relative difference of the values; ours from scratch as well (factor
   recomputed each call, as the peers do); and vs one bare float64 ``eigvalsh`` of a d x d matrix
   (the floor of any eigen route).
2. FD-loss forward+backward w.r.t. (mu_q, sigma_q): ours (closed-form backward) vs plain autograd
   through ``torch.linalg.eigvalsh`` (same cached A).
3. Exact population: one training step of an MLP generator with N samples as k micro-batches
   (two-pass) vs one full batch: gradient relative error and peak memory. Each variant runs in a
   fresh subprocess that resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) right
   before the step and reports the peak RSS during the step minus the RSS just before it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from fd_onestep.frechet import frechet_distance, frechet_distance_to_reference
from fd_onestep.losses import FDLoss
from fd_onestep.populations import ExactPopulation
from fd_onestep.reference_stats import ReferenceStats


def _stats(d: int, seed: int, shift: float = 0.0):
    """Sample statistics of 2d + 512 features with a power-law spectrum (lambda_i ~ 1/i, like
    encoder features) in a random basis: condition number ~ 1e4, well within float64."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * d + 512
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    spectrum = 1.0 / torch.arange(1, d + 1, dtype=torch.float64)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * spectrum.sqrt()) @ basis.T + shift
    return x.mean(0), torch.cov(x.T)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _interleaved(fns: dict, repeats: dict) -> dict:
    """Best time of each fn, running them round-robin so contention affects all alike."""
    best = {k: float("inf") for k in fns}
    for r in range(max(repeats.values())):
        for name, fn in fns.items():
            if r < repeats[name]:
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
    return best


def _autograd_eigvalsh_loss(ref: ReferenceStats, mu_q, sigma_q):
    a = ref.sqrt_sigma
    m = a @ sigma_q @ a
    lam = torch.linalg.eigvalsh((m + m.mT) * 0.5)
    diff = mu_q - ref.mu
    return diff.dot(diff) + ref.trace_sigma + sigma_q.diagonal().sum() - 2 * lam.clamp(min=0).sqrt().sum()


def bench_value_and_loss(d: int, repeats: int, slow_repeats: int) -> dict:
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torchmetrics.image.fid import _compute_fid

    mu_p, s_p = _stats(d, 0)
    mu_q, s_q = _stats(d, 1, shift=0.1)
    ref = ReferenceStats(mu=mu_p, sigma=s_p)
    t0 = time.perf_counter()
    ref.factor  # computed once per reference, then cached
    t_root = time.perf_counter() - t0
    ref.sqrt_sigma  # the autograd peer's A, also outside its timings
    mu_p_np, s_p_np, mu_q_np, s_q_np = (t.numpy() for t in (mu_p, s_p, mu_q, s_q))
    out = {}

    def ours():
        out["ours"] = float(frechet_distance_to_reference(ref, mu_q, s_q))

    def scratch():
        out["scratch"] = float(frechet_distance(mu_p, s_p, mu_q, s_q))

    def pfid():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["pfid"] = float(calculate_frechet_distance(mu_p_np, s_p_np, mu_q_np, s_q_np))

    def tmetrics():
        out["tm"] = float(_compute_fid(mu_p, s_p, mu_q, s_q))

    def bare():
        torch.linalg.eigvalsh(s_q)

    times = _interleaved(
        {"ours": ours, "scratch": scratch, "eigvalsh": bare, "pfid": pfid, "tm": tmetrics},
        {"ours": repeats, "scratch": repeats, "eigvalsh": repeats, "pfid": slow_repeats, "tm": slow_repeats},
    )

    grads = {}

    def ours_fb():
        mu = mu_q.clone().requires_grad_()
        s = s_q.clone().requires_grad_()
        frechet_distance_to_reference(ref, mu, s).backward()
        grads["ours"] = s.grad

    def autograd_fb():
        mu = mu_q.clone().requires_grad_()
        s = s_q.clone().requires_grad_()
        _autograd_eigvalsh_loss(ref, mu, s).backward()
        grads["autograd"] = s.grad

    fb = _interleaved({"ours": ours_fb, "autograd": autograd_fb}, {"ours": slow_repeats, "autograd": slow_repeats})
    grad_diff = float((grads["ours"] - grads["autograd"]).norm() / grads["autograd"].norm())
    return {
        "d": d,
        "root_once_s": t_root,
        "ours_s": times["ours"],
        "scratch_s": times["scratch"],
        "eigvalsh_s": times["eigvalsh"],
        "pfid_s": times["pfid"],
        "tm_s": times["tm"],
        "rel_pfid": abs(out["ours"] - out["pfid"]) / abs(out["pfid"]),
        "rel_tm": abs(out["ours"] - out["tm"]) / abs(out["tm"]),
        "fb_ours_s": fb["ours"],
        "fb_autograd_s": fb["autograd"],
        "fb_grad_rel_diff": grad_diff,
    }


# ---------------------------------------------------------------------------- exact population


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so the peak covers only the step (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _exact_worker(variant: str, d: int, n: int, k: int, hidden: int, out_path: str) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    g = torch.Generator().manual_seed(0)
    ref = ReferenceStats.from_features(torch.tanh(torch.randn(2 * d + 512, d, generator=g, dtype=torch.float64)))
    ref.factor
    torch.manual_seed(0)
    gen = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
        torch.nn.Linear(hidden, d), torch.nn.Tanh(),
    ).double()
    noise = torch.randn(n, 64, generator=g, dtype=torch.float64)
    import gc

    gc.collect()
    before = _rss_bytes()
    reset = _reset_peak_rss()
    t = time.perf_counter()
    if variant == "full":
        feats = gen(noise)
        mu = feats.mean(0)
        xc = feats - mu
        sigma = xc.mT @ xc / (n - 1)
        ref.frechet_distance(mu, sigma).backward()
    else:
        population = ExactPopulation(d, micro_batches=k)
        loss_fn = FDLoss(ref, population)
        population.begin_step()
        with torch.no_grad():
            for chunk in noise.chunk(k):
                population.accumulate(gen(chunk))
        for chunk in noise.chunk(k):
            loss_fn(gen(chunk)).backward()
    elapsed = time.perf_counter() - t
    peak = _peak_rss_bytes()
    if not reset:
        print("warning: could not reset the peak RSS counter; peak includes the setup", file=sys.stderr)
    torch.save([p.grad for p in gen.parameters()], out_path + ".grads.pt")
    with open(out_path, "w") as f:
        json.dump({"step_s": elapsed, "peak_delta_bytes": peak - before, "peak_bytes": peak}, f)


def bench_exact(d: int, n: int, k: int, hidden: int, threads: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("full", "exact"):
            path = os.path.join(tmp, variant + ".json")
            env = dict(os.environ, BENCH_THREADS=str(threads))
            subprocess.run(
                [sys.executable, __file__, "--_exact-worker", variant, "--_d", str(d), "--_n", str(n),
                 "--_k", str(k), "--_hidden", str(hidden), "--_out", path],
                check=True, env=env,
            )
            with open(path) as f:
                results[variant] = json.load(f)
            results[variant]["grads"] = torch.load(path + ".grads.pt", weights_only=True)
    num = sum(float((a - b).square().sum()) for a, b in zip(results["exact"]["grads"], results["full"]["grads"]))
    den = sum(float(b.square().sum()) for b in results["full"]["grads"])
    return {
        "d": d, "n": n, "k": k,
        "grad_rel_err": (num / den) ** 0.5,
        "full_mib": results["full"]["peak_delta_bytes"] / 2**20,
        "exact_mib": results["exact"]["peak_delta_bytes"] / 2**20,
        "full_s": results["full"]["step_s"],
        "exact_s": results["exact"]["step_s"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small dimensions: a smoke run in seconds")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="feature dimensions (default 768 1152 2048)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the fast timings (best of)")
    parser.add_argument("--slow_repeats", type=int, default=2, help="repeats of the slow timings (peers, fwd+bwd)")
    parser.add_argument("--_exact-worker", dest="exact_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_d", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_hidden", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.exact_worker:
        _exact_worker(args.exact_worker, args._d, args._n, args._k, args._hidden, args._out)
        return

    torch.set_num_threads(args.threads)
    dims = args.dims or ([96, 192] if args.quick else [768, 1152, 2048])
    exact_cfg = (512, 4, 128) if args.quick else (4096, 8, 1024)  # (N samples, k micro-batches, hidden)
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    value_rows, exact_rows = [], []
    for d in dims:
        value_rows.append(bench_value_and_loss(d, args.repeats, args.slow_repeats))
        print(f"[d={d}] value/loss done", file=sys.stderr, flush=True)
        n, k, hidden = exact_cfg
        exact_rows.append(bench_exact(d, max(n, 2 * d), k, hidden, args.threads))
        print(f"[d={d}] exact population done", file=sys.stderr, flush=True)

    print(f"\nFD core benchmark: torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"{time.perf_counter() - t_start:.0f} s total. Times in seconds, best of repeats.\n")
    print("| d | ours FD value | pytorch-fid | speedup | torchmetrics | speedup | rel. diff vs pytorch-fid | rel. diff vs torchmetrics | bare eigvalsh | value / eigvalsh | reference factor (once) | ours from scratch | speedup vs pytorch-fid |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in value_rows:
        print(f"| {r['d']} | {r['ours_s']:.3f} | {r['pfid_s']:.2f} | {r['pfid_s'] / r['ours_s']:.1f}x | {r['tm_s']:.2f} | "
              f"{r['tm_s'] / r['ours_s']:.1f}x | {r['rel_pfid']:.1e} | {r['rel_tm']:.1e} | {r['eigvalsh_s']:.3f} | "
              f"{r['ours_s'] / r['eigvalsh_s']:.2f} | {r['root_once_s']:.3f} | {r['scratch_s']:.3f} | "
              f"{r['pfid_s'] / r['scratch_s']:.1f}x |")
    print("\n| d | FD-loss fwd+bwd (closed form) | autograd through eigvalsh | ours / autograd | grad rel. diff |")
    print("|---|---|---|---|---|")
    for r in value_rows:
        print(f"| {r['d']} | {r['fb_ours_s']:.3f} | {r['fb_autograd_s']:.3f} | {r['fb_ours_s'] / r['fb_autograd_s']:.2f} | "
              f"{r['fb_grad_rel_diff']:.1e} |")
    print("\n| d | N samples | k micro-batches | exact grad rel. error vs full batch | peak step memory full (MiB) | exact (MiB) | exact / full | step time full (s) | exact (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in exact_rows:
        print(f"| {r['d']} | {r['n']} | {r['k']} | {r['grad_rel_err']:.1e} | {r['full_mib']:.0f} | {r['exact_mib']:.0f} | "
              f"{r['exact_mib'] / r['full_mib']:.2f} | {r['full_s']:.2f} | {r['exact_s']:.2f} |")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
