"""GPU acceptance check, printed as markdown tables; exits 1 if any check fails.

    python benchmarks/gpu_check.py                  # on CUDA device 0: under 5 minutes on one GPU
    python benchmarks/gpu_check.py --cpu            # the same checks on the CPU (automatic without CUDA)
    python benchmarks/gpu_check.py --cpu --quick    # smallest sizes, seconds: the smoke run of tests/test_gpu_check.py

Run it from a checkout with the test extra installed (``pip install -e ".[test]"``): the tiny models are the
test suite's own builders (``tests/test_pipeline_tiny_models.py``), built from configs, no downloads.

1. Training steps. For every registered family (``FAMILY_ADAPTERS``: its tiny teacher) and both trainings (full
   fine-tuning and LoRA), one optimizer step of the tiny one-step generator in bf16, set up as the training
   script sets it up: ``OneStepGenerator(..., weight_dtype=torch.bfloat16)`` (frozen VAE / text encoders in
   bf16; an SDXL VAE with ``force_upcast`` in float32), ``add_lora`` (LoRA base weights in bf16, LoRA parameters in float32) or the full float32 denoiser,
   the generator under ``torch.autocast(bf16)``, a tiny DINOv2 encoder and FD-loss with a warm-started EMA
   population on the device. Checks: dtypes as stated, float32 images, finite FD, finite float32 gradients
   on every trainable parameter (some non-zero), none on frozen ones, and the optimizer step moves them.
2. FD on the device against the CPU in float64: value and gradient (w.r.t. mu_q and sigma_q) of
   ``ReferenceStats.frechet_distance`` (cached reference factor) and of ``fd_onestep.frechet.frechet_distance``
   (from scratch), random statistics at d = 256 and d = 2048.
3. Cost at Inception-sized features: one FD-loss forward+backward (EMA population, d = 2048, batch 64) next to
   one forward+backward of a generator step (CIFAR-size DDPM UNet2DModel, random weights, batch 64, bf16
   autocast): median time and peak device memory (``torch.cuda.max_memory_allocated``; n/a on the CPU).
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from fd_onestep.pipelines.pipeline_fd_onestep import FAMILY_ADAPTERS

REPO_ROOT = Path(__file__).resolve().parent.parent
FAMILIES = tuple(FAMILY_ADAPTERS)  # every registered family
TRAININGS = ("full", "lora")
PROMPTS = ["a cab", "a dog", "two cats", "the sea"]
# float64 on the device vs the CPU: eigh / matmul round-off only (both routes are float64)
VALUE_RTOL = 1e-9
GRAD_RTOL = 1e-7


# ----------------------------------------------------------------------------------------------- helpers
def _tiny_teachers():
    """The test suite's tiny teacher builders (``TEACHERS``, ``FAMILY_KWARGS``)."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    try:
        from test_pipeline_tiny_models import FAMILY_KWARGS, TEACHERS
    except ImportError as err:
        raise SystemExit(
            f"gpu_check needs the test suite's tiny models ({REPO_ROOT / 'tests' / 'test_pipeline_tiny_models.py'}): "
            f"run it from a checkout with the test extra installed (pip install -e '.[test]'); {err}"
        ) from None
    return TEACHERS, FAMILY_KWARGS


def _stats(d: int, seed: int, shift: float = 0.0):
    """Random float64 statistics with an encoder-like spectrum (benchmarks/bench_frechet.py's)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_frechet import _stats as bench_stats

    return bench_stats(d, seed, shift)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """(median seconds over ``repeats`` calls after one warm-up, peak device MiB of one call or None on the CPU)."""
    fn()
    _sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], peak


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (both moved to the CPU, float64)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- 1. training steps
def _one_step_pipeline(family: str, teachers, family_kwargs):
    import inspect

    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

    torch.manual_seed(0)
    teacher = teachers[family]()
    names = set(inspect.signature(FDOneStepPipeline.__init__).parameters)
    components = {k: v for k, v in teacher.components.items() if k in names}
    # tanh bound: the tiny epsilon teachers' top-level conversion is ill-conditioned (and warns otherwise)
    return FDOneStepPipeline(**components, **family_kwargs.get(family, {}), output_bound="tanh")


def _encoder(device: torch.device, folder: Path):
    from fd_onestep.encoders import load_encoder
    from fd_onestep.encoders.testing import save_tiny_dinov2

    if not (folder / "config.json").is_file():
        save_tiny_dinov2(folder, image_size=28, hidden_size=16)
    encoder = load_encoder(str(folder), device=device)
    encoder.requires_grad_(False)
    return encoder.eval()


def training_step(pipe, training: str, device: torch.device, dtype: torch.dtype, encoder) -> tuple[list, list[str]]:
    """One bf16 optimizer step of the one-step generator over ``pipe`` (changed in place: pass a copy);
    returns (table row, failed checks)."""
    from fd_onestep.losses import FDLoss
    from fd_onestep.onestep import OneStepGenerator
    from fd_onestep.populations import EMAPopulation
    from fd_onestep.reference_stats import ReferenceStats

    failures = []
    family = pipe.family

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(f"{family}/{training}: {what}")

    gen = OneStepGenerator(pipe, prompts=PROMPTS if pipe.is_text_conditional else None, device=device,
                           weight_dtype=dtype)
    if training == "lora":
        denoiser = gen.add_lora(rank=4)
    else:
        denoiser = gen.denoiser.requires_grad_(True)
    denoiser.train()
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    kept = set(pipe.float32_component_names)  # e.g. an SDXL VAE with force_upcast
    frozen_dtypes = {p.dtype for name in pipe.frozen_component_names if name not in kept
                     for p in getattr(pipe, name).parameters()}
    kept_dtypes = {p.dtype for name in kept for p in getattr(pipe, name).parameters()}
    check(bool(trainable) and {p.dtype for p in trainable} == {torch.float32}, "trainable parameters not float32")
    check(not frozen_dtypes or frozen_dtypes == {dtype}, f"frozen modules in {frozen_dtypes}, not {dtype}")
    check(not kept_dtypes or kept_dtypes == {torch.float32}, f"{sorted(kept)} in {kept_dtypes}, not float32")
    if training == "lora":
        base = {p.dtype for p in denoiser.parameters() if not p.requires_grad}
        check(base == {dtype}, f"LoRA base weights in {base}, not {dtype}")

    rng = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype)
    with torch.no_grad():
        reference_images = torch.tanh(torch.randn(64, *gen.image_shape, generator=rng)).to(device)
        reference = ReferenceStats.from_features(encoder(reference_images).double(), encoder_id="tiny-dinov2")
        population = EMAPopulation(encoder.feature_dim, beta=0.9).to(device)
        warm = []
        for _ in range(2):
            with autocast:
                images = gen(denoiser, gen.sample_noise(16, generator=rng), gen.sample_conditioning(16, generator=rng))
            warm.append(encoder(images.float().clamp(-1, 1)))
        population.warm_start(warm)
    fd_loss = FDLoss(reference, population)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    before = [p.detach().clone() for p in trainable]
    # parameters the one step cannot reach are the architecture's, not a broken graph (the last MMDiT block of
    # Qwen-Image computes a text-stream output that nothing reads): the gradient check skips those alone
    probe_rng = torch.Generator(device=rng.device).manual_seed(1)  # the checked step's draws stay as they were
    with autocast:
        probe = gen(denoiser, gen.sample_noise(2, generator=probe_rng), gen.sample_conditioning(2, generator=probe_rng))
    reachable = [g is not None for g in torch.autograd.grad(probe.float().sum(), trainable, allow_unused=True)]

    start = time.perf_counter()
    noise, cond = gen.sample_noise(8, generator=rng), gen.sample_conditioning(8, generator=rng)
    with autocast:
        images = gen(denoiser, noise, cond)
    check(images.dtype == torch.float32, f"images in {images.dtype}, not float32")
    loss = fd_loss(encoder(images.float().clamp(-1, 1)))
    loss.backward()
    loss = loss.detach()
    grads = [p.grad for p in trainable]
    grad_norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))
    optimizer.step()
    _sync(device)
    seconds = time.perf_counter() - start

    check(bool(torch.isfinite(loss)), f"FD not finite ({float(loss)})")
    check(all(g is not None for g, r in zip(grads, reachable) if r), "a trainable parameter got no gradient")
    check(all(g is None or (g.dtype == torch.float32 and bool(torch.isfinite(g).all())) for g in grads),
          "gradient not finite float32")
    check(any(g is not None and bool(g.abs().sum() > 0) for g in grads), "all gradients zero")
    check(all(p.grad is None for p in denoiser.parameters() if not p.requires_grad), "a frozen weight got a gradient")
    check(any(not torch.equal(b, p.detach()) for b, p in zip(before, trainable)), "the optimizer step moved nothing")
    row = [family, training, f"{sum(p.numel() for p in trainable):,}",
           ", ".join(sorted(str(t).replace("torch.", "") for t in frozen_dtypes)) or "-",
           f"{float(loss):.4g}", f"{grad_norm:.3g}", f"{seconds * 1e3:.0f}", "ok" if not failures else "FAIL"]
    return row, failures


# ----------------------------------------------------------------------------------------------- 2. FD vs CPU float64
def fd_against_cpu(d: int, device: torch.device) -> tuple[list[list], list[str]]:
    """FD value and gradient on ``device`` vs the CPU, float64, both routes; (rows, failed checks)."""
    from fd_onestep.frechet import frechet_distance
    from fd_onestep.reference_stats import ReferenceStats

    mu_p, sigma_p = _stats(d, seed=0)
    mu_q, sigma_q = _stats(d, seed=1, shift=0.05)
    rows, failures = [], []
    routes = {
        "ReferenceStats.frechet_distance": lambda ref, mp, sp, mq, sq: ref.frechet_distance(mq, sq),
        "frechet_distance": lambda ref, mp, sp, mq, sq: frechet_distance(mp, sp, mq, sq),
    }
    for route, fn in routes.items():
        results = {}
        for where in (torch.device("cpu"), device):
            mq = mu_q.to(where).requires_grad_(True)
            sq = sigma_q.to(where).requires_grad_(True)
            ref = ReferenceStats(mu_p, sigma_p)  # fresh: its factor is cached per device
            value = fn(ref, mu_p.to(where), sigma_p.to(where), mq, sq)
            value.backward()
            results[where.type] = (value.detach(), mq.grad, sq.grad)
        (v0, gm0, gs0), (v1, gm1, gs1) = results["cpu"], results[device.type]
        rel_value = abs(float(v1) - float(v0)) / abs(float(v0))
        rel_mu, rel_sigma = _rel(gm1, gm0), _rel(gs1, gs0)
        ok = rel_value <= VALUE_RTOL and rel_mu <= GRAD_RTOL and rel_sigma <= GRAD_RTOL
        ok = ok and v1.device.type == device.type and v1.dtype == torch.float64
        if not ok:
            failures.append(f"FD d={d} {route}: value rel {rel_value:.2e} (<= {VALUE_RTOL:g}), grad rel "
                            f"{rel_mu:.2e} / {rel_sigma:.2e} (<= {GRAD_RTOL:g})")
        rows.append([d, route, f"{float(v0):.10g}", f"{rel_value:.1e}", f"{rel_mu:.1e}", f"{rel_sigma:.1e}",
                     "ok" if ok else "FAIL"])
    return rows, failures


# ----------------------------------------------------------------------------------------------- 3. cost
def _cifar_unet(quick: bool):
    from diffusers import UNet2DModel

    if quick:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from test_pipeline_tiny_models import tiny_unet2d

        return tiny_unet2d()
    # google/ddpm-cifar10-32's configuration (35.7 M parameters), random weights
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def cost(d: int, batch: int, device: torch.device, dtype: torch.dtype, repeats: int, quick: bool):
    """Rows of (step, size, median ms, peak MiB) for FD-loss and a generator step."""
    from diffusers import DDPMScheduler

    from fd_onestep.losses import FDLoss
    from fd_onestep.onestep import OneStepGenerator
    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline
    from fd_onestep.populations import EMAPopulation
    from fd_onestep.reference_stats import ReferenceStats

    g = torch.Generator().manual_seed(0)
    mu_p, sigma_p = _stats(d, seed=0)
    population = EMAPopulation(d).to(device)
    population.warm_start([torch.randn(4 * d, d, generator=g).to(device)])
    fd_loss = FDLoss(ReferenceStats(mu_p, sigma_p), population)
    features = torch.randn(batch, d, generator=g).to(device).requires_grad_(True)

    def fd_step():
        features.grad = None
        fd_loss(features).backward()

    unet = _cifar_unet(quick)
    pipe = FDOneStepPipeline(unet=unet, scheduler=DDPMScheduler(prediction_type="v_prediction",
                                                                rescale_betas_zero_snr=True))
    gen = OneStepGenerator(pipe, device=device)
    unet.requires_grad_(True).train()
    noise = gen.sample_noise(batch, generator=g)

    def generator_step():
        unet.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            images = gen(unet, noise)
        images.square().mean().backward()

    rows = []
    fd_s, fd_mib = _timed(fd_step, device, repeats)
    gen_s, gen_mib = _timed(generator_step, device, repeats)
    params = sum(p.numel() for p in unet.parameters())
    side = unet.config.sample_size
    mib = (lambda m: "n/a" if m is None else f"{m:.0f}")
    rows.append(["FD-loss forward+backward (EMA population)", f"d = {d}, batch {batch}", f"{fd_s * 1e3:.1f}",
                 mib(fd_mib)])
    rows.append([f"generator forward+backward (UNet2DModel, {params:,} parameters, "
                 f"{str(dtype).replace('torch.', '')} autocast)", f"batch {batch}, {side}x{side}",
                 f"{gen_s * 1e3:.1f}", mib(gen_mib)])
    rows.append(["ratio FD-loss / generator", "", f"{fd_s / gen_s:.2f}", ""])
    return rows


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="Run on the CPU (automatic when CUDA is not available).")
    parser.add_argument("--quick", action="store_true", help="Smallest sizes (a smoke run of the script).")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--trainings", nargs="+", default=list(TRAININGS), choices=TRAININGS)
    parser.add_argument("--repeats", type=int, default=None, help="Timed repeats (default 5, quick 1).")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    on_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", 0) if on_cuda else torch.device("cpu")
    dtype = torch.bfloat16
    fd_dims = (16, 64) if args.quick else (256, 2048)
    cost_d, cost_batch = (64, 4) if args.quick else (2048, 64)
    repeats = args.repeats or (1 if args.quick else 5)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # e.g. the `to(dtype)` notice of every cast model
    transformers.utils.logging.disable_progress_bar()
    name = torch.cuda.get_device_name(device) if on_cuda else platform.processor() or platform.machine()
    print(f"# fd-onestep GPU check on {device} ({name}); torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
          f"{', quick sizes' if args.quick else ''}\n")
    if not on_cuda and not args.cpu:
        print("(no CUDA device: running the CPU mode)\n")
    failures = []
    start = time.perf_counter()

    teachers, family_kwargs = _tiny_teachers()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        encoder = _encoder(device, Path(tmp) / "tiny-dinov2")
        for family in args.families:
            pipe = _one_step_pipeline(family, teachers, family_kwargs)
            for training in args.trainings:
                try:
                    row, failed = training_step(copy.deepcopy(pipe), training, device, dtype, encoder)
                except Exception as err:  # a crash is a failed check: report it and go on
                    row, failed = [family, training, "", "", "", "", "", "FAIL"], [f"{family}/{training}: "
                                                                                    f"{type(err).__name__}: {err}"]
                rows.append(row)
                failures += failed
    print(f"## 1. One bf16 training step per family ({device.type})\n")
    print(_table(["family", "training", "trainable", "frozen dtype", "FD", "grad norm", "step ms", "check"], rows))

    rows = []
    for d in fd_dims:
        r, failed = fd_against_cpu(d, device)
        rows += r
        failures += failed
    print(f"\n## 2. FD value and gradient on {device.type} vs the CPU (float64)\n")
    print(_table(["d", "route", "FD (CPU)", "value rel diff", "grad mu rel diff", "grad sigma rel diff", "check"],
                 rows))

    print(f"\n## 3. FD-loss next to the generator step ({device.type}, median of {repeats})\n")
    print(_table(["step", "size", "time ms", "peak MiB"], cost(cost_d, cost_batch, device, dtype, repeats,
                                                               args.quick)))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if failures:
        print(f"\n{len(failures)} FAILED CHECK(S):")
        for failure in failures:
            print(f"- {failure}")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
