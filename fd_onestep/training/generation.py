"""Generation and features of the training script: the global batch's noise and conditioning drawn
identically on every process, the generator's images under the run's autocast, the encoders' features, fresh-sample
streams (validation, warm start, sample PNGs) and the generator-EMA weights swapped in."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch
from accelerate.logging import get_logger
from fd_onestep.training.sharding import is_sharded

logger = get_logger(__name__, log_level="INFO")


def unwrap(accelerator, model):
    """The plain module under DDP / torch.compile wrappers."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


# Generation and features
def draw_local_batch(accelerator, gen, global_n: int, rng: torch.Generator, first_index: int | None = None):
    """The global batch's noise + conditioning, drawn identically on every process; this process's rows.

    ``first_index``: class-conditional models get the balanced labels ``(first_index + i) % num_classes`` of the
    global rows (validation, samples: every class equally often) instead of drawn ones (same noise either way).
    Returns ``(noise, conditioning or None, index of the first local row in the global batch)``.
    """
    device = accelerator.device
    noise = gen.sample_noise(global_n, generator=rng, device=device)
    cond = gen.sample_conditioning(global_n, generator=rng, device=device)
    if first_index is not None and gen.labeled:
        labels = (torch.arange(global_n) + first_index) % gen.num_label_classes
        cond = gen.conditioning_for_labels(labels, generator=rng, device=device)
    with accelerator.split_between_processes(list(range(global_n))) as rows:
        start, end = (rows[0], rows[-1] + 1) if rows else (global_n, global_n)
    return noise[start:end], (cond[start:end] if cond is not None else None), start


def generate_images(accelerator, gen, model, noise, cond) -> torch.Tensor:
    """The generator's images (B, C, H, W) float32, under the run's mixed-precision autocast.

    The encoders run outside it, in their own precision (``--encoder_autocast``), in every pass: the exact
    population's two passes and validation then describe the same samples with the same features.
    """
    with accelerator.autocast():
        return gen(model, noise, cond).float()


def encode(images, encoders) -> dict:
    # Clamped as saving the images would: the encoders measure exactly what a user gets (a no-op under
    # --output_bound tanh/clamp; unbounded outputs lose the gradient of their out-of-range pixels only).
    images = images.clamp(-1.0, 1.0)
    return {name: enc(images) for name, enc in encoders.items()}


@contextlib.contextmanager
def ema_weights(ema, trainable):
    """The generator-EMA weights swapped in (``--use_ema``): validation, samples and saved weights use them."""
    if ema is None:
        yield
        return
    ema.store(trainable)
    ema.copy_to(trainable)
    try:
        yield
    finally:
        ema.restore(trainable)


def class_labels_of(cond) -> torch.Tensor | None:
    """The (B,) int64 class labels of a batch's conditioning, or None (unconditional, text)."""
    return getattr(cond, "class_labels", None)


def stream_features(accelerator, gen, model, total: int, seed: int, encoders, batch_size: int, on_images=None,
                    balanced: bool = False):
    """Yield per-chunk ``(feature dict, class labels or None)`` of ``total`` fresh no-grad samples (global count,
    split over processes).

    ``on_images(images, first_global_index, labels)`` sees each local chunk of images; a process with no rows
    in a chunk yields ``(None, None)`` (every process yields once per chunk, so collectives stay in step; with a
    sharded denoiser it still runs a forward of one spare sample, since every process must join each forward).
    ``balanced``: class-conditional models get every class equally often (:func:`draw_local_batch`).
    """
    rng = torch.Generator().manual_seed(seed)
    done = 0
    while done < total:
        n = min(batch_size * accelerator.num_processes, total - done)
        noise, cond, start = draw_local_batch(accelerator, gen, n, rng, first_index=done if balanced else None)
        features, labels = None, class_labels_of(cond)
        # inference mode: no autograd bookkeeping in the generator or the encoders (the yielded tensors are
        # only read afterwards: moments, warm starts, PNGs); a sharded (FSDP2) model: no_grad, since the root
        # module keeps its gathered parameters after the forward and inference tensors cannot enter training
        with torch.no_grad() if is_sharded(model) else torch.inference_mode():
            if noise.shape[0]:
                images = generate_images(accelerator, gen, model, noise, cond)
                if on_images is not None:
                    on_images(images, done + start, labels)
                features = encode(images, encoders)
            elif is_sharded(model):  # a sharded forward needs every process: join it with a sample that is dropped
                spare = torch.Generator().manual_seed(seed)
                generate_images(accelerator, gen, model, gen.sample_noise(1, generator=spare, device=accelerator.device),
                                gen.sample_conditioning(1, generator=spare, device=accelerator.device))
        yield features, (labels if features is not None else None)
        done += n


def warm_start_populations(args, accelerator, gen, model, encoders, fd_loss) -> None:
    """Populations start from the exact moments of ``--fd_warmup_samples`` generated samples.

    One generation pass for all encoders; the features (fd_warmup_samples x d float32 per encoder and
    process) are kept until every population has taken them (its warm_start reduces over processes).
    """
    logger.info(f"Warm-starting the FD populations from {args.fd_warmup_samples} generated samples")
    chunks, label_chunks = {name: [] for name in encoders}, []
    for feats, labels in stream_features(accelerator, gen, model, args.fd_warmup_samples, args.seed + 1, encoders,
                                         args.sample_batch_size):
        for name in encoders:
            chunks[name].append(feats[name].detach() if feats is not None
                                else torch.zeros(0, encoders[name].feature_dim, device=accelerator.device))
        label_chunks.append(labels if labels is not None
                            else torch.zeros(0, dtype=torch.long, device=accelerator.device))
    for name, loss in fd_loss.losses.items():
        loss.warm_start(chunks[name], label_chunks if loss.label_embedding is not None else None)


def write_samples(args, accelerator, gen, model) -> None:
    """``--num_output_samples`` student samples as ``DIR/samples/000123.png`` (all processes write their share);
    class-conditional models with uniform labels: every class equally often, ``DIR/samples/<label>/000123.png``."""
    from fd_onestep.images import save_images

    sample_folder = Path(args.output_dir) / "samples"
    if accelerator.is_main_process:
        if sample_folder.exists():
            shutil.rmtree(sample_folder)
        sample_folder.mkdir(parents=True)
    accelerator.wait_for_everyone()
    balanced = gen.labeled and args.class_label_distribution == "uniform"
    for _ in stream_features(accelerator, gen, model, args.num_output_samples, args.seed + 4, {}, args.sample_batch_size,
                             on_images=lambda imgs, start, labels: save_images(imgs, sample_folder, start, labels),
                             balanced=balanced):
        pass
    accelerator.wait_for_everyone()
