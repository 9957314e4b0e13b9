#!/usr/bin/env python
"""Train the bundled digit encoders and compute their reference statistics.

Four transformers vision models are written as ``save_pretrained`` folders (safetensors + an image
processor config), so that ``AutoModel.from_pretrained(folder)``, ``AutoImageProcessor.from_pretrained(folder)``
and ``fd_onestep.encoders.load_encoder(folder)`` load them exactly like hub checkpoints:

- ``dinov2-digits``  ``Dinov2Model`` (patch 4 at 16x16, CLS pooler) trained as a digit classifier with a
  linear head on ``pooler_output`` (the head is dropped): a training representation for FD-loss;
- ``siglip-digits``  ``SiglipVisionModel`` (patch 4 at 16x16, attention-pooling head) trained the same way:
  a training representation;
- ``resnet-digits``  ``ResNetForImageClassification`` (32x32 input) trained as a digit classifier: held out
  of the loss; its backbone (``AutoModel`` -> ``ResNetModel``) is an evaluation representation and the
  full model is the digit classifier for class histograms;
- ``randcnn-digits`` ``ResNetModel`` with random weights from a fixed seed, never trained (only its
  batch-norm running statistics are set from one no-gradient pass over the train split, so that features
  have unit scale): a held-out evaluation representation (an untrained random CNN tracks sample quality
  well and cannot be gamed by training on it).
- ``randconvnext-digits`` ``ConvNextModel`` with random weights from a fixed seed, never trained (no layer
  scale, so that every random block contributes): an optional *training* representation, a random-feature
  encoder of another architecture than the held-out ``randcnn-digits`` (depthwise 7x7 convolutions, layer
  norm, GELU, against a ResNet's 3x3 convolutions, batch norm, ReLU), for the quality preset.

All images are the gray digits replicated to RGB and normalized with mean = std = 0.5, so the networks
see the [-1, 1] images as they are. Training uses light augmentation (random affine: +-10 degrees, scale
0.9-1.1, shift +-1 px) on the fixed digits train split only; accuracy is measured on the validation split.

Then (unless ``--skip_stats``) the reference statistics of every encoder are computed on the train split
**through** ``load_encoder(<folder>)`` (the path users take), with ``validation_fd`` = FD of the validation
split's features against the train statistics, and written to ``<output_dir>/../stats/<name>.safetensors``.

    python -m fd_onestep.demos.digits.train_encoders --output_dir fd_onestep/demos/digits/assets/encoders
    python -m fd_onestep.demos.digits.train_encoders --output_dir fd_onestep/demos/digits/assets/encoders --stats_only
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fd_onestep.demos.digits import (
    BUILTIN_ENCODERS,
    NUM_CLASSES,
    encoder_spec,
    load_digits_split,
    write_split_metadata,
)
from fd_onestep.classifiers import processor_input_size
from fd_onestep.demos.digits.asset_training import asset_script_parser, clipped_step

ENCODER_NAMES = ("dinov2-digits", "siglip-digits", "resnet-digits", "randcnn-digits", "pixels-digits",
                 "randconvnext-digits")


def parse_args(argv=None):
    p = asset_script_parser(__doc__, "folder that receives one subfolder per encoder.")
    p.add_argument("--stats_dir", type=str, default=None, help="default: <output_dir>/../stats")
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--encoders", nargs="+", default=list(ENCODER_NAMES), choices=ENCODER_NAMES)
    p.add_argument("--stats_only", action="store_true", help="only (re)compute the reference statistics.")
    p.add_argument("--skip_stats", action="store_true", help="train and save the encoders, no statistics.")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- models


def _label_maps():
    id2label = {i: str(i) for i in range(NUM_CLASSES)}
    return id2label, {v: k for k, v in id2label.items()}


def build_model(name: str):
    """Return ``(backbone_or_classifier, image_processor, feature_fn)``; ``feature_fn(model, x)`` -> (N, d)."""
    from transformers import (
        BitImageProcessor,
        ConvNextConfig,
        ConvNextModel,
        Dinov2Config,
        Dinov2Model,
        ResNetConfig,
        ResNetForImageClassification,
        ResNetModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    half = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    if name == "dinov2-digits":
        config = Dinov2Config(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, image_size=16, patch_size=4,
            num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
        )
        processor = BitImageProcessor(
            do_resize=True, size={"shortest_edge": 16}, resample=2, do_center_crop=True,
            crop_size={"height": 16, "width": 16}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            do_convert_rgb=True, **half,
        )
        return Dinov2Model(config), processor, lambda m, x: m(pixel_values=x).pooler_output
    if name == "siglip-digits":
        config = SiglipVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=16,
            patch_size=4, num_channels=3,
        )
        processor = SiglipImageProcessor(
            do_resize=True, size={"height": 16, "width": 16}, resample=2, do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, do_convert_rgb=True, **half,
        )
        return SiglipVisionModel(config), processor, lambda m, x: m(pixel_values=x).pooler_output
    # BitImageProcessor (not ResNet's usual ConvNextImageProcessor): it converts grayscale PIL images to RGB.
    resnet_processor = BitImageProcessor(
        do_resize=True, size={"shortest_edge": 32}, resample=2, do_center_crop=True,
        crop_size={"height": 32, "width": 32}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        do_convert_rgb=True, **half,
    )
    if name == "resnet-digits":
        id2label, label2id = _label_maps()
        config = ResNetConfig(
            num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic",
            num_labels=NUM_CLASSES, id2label=id2label, label2id=label2id,
        )
        return ResNetForImageClassification(config), resnet_processor, None
    if name == "randcnn-digits":
        config = ResNetConfig(
            num_channels=3, embedding_size=32, hidden_sizes=[64, 128], depths=[1, 1], layer_type="basic",
        )
        return ResNetModel(config), resnet_processor, None
    if name == "randconvnext-digits":
        config = ConvNextConfig(
            num_channels=3, patch_size=2, num_stages=3, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
            layer_scale_init_value=0.0,
        )
        return ConvNextModel(config), resnet_processor, None
    raise ValueError(f"unknown digits encoder {name!r}; choose from {ENCODER_NAMES}.")


def _input_size(processor) -> int:
    return processor_input_size(processor)[0]


def to_pixel_values(images: torch.Tensor, size: int) -> torch.Tensor:
    """[-1, 1] (N, 1, 16, 16) -> (N, 3, size, size): gray -> RGB, bilinear resize, (x01 - 0.5) / 0.5 = x."""
    x = images.expand(-1, 3, -1, -1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine per image: rotation +-10 deg, scale 0.9-1.1, shift +-1 px (of 16); background stays -1."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2.0 / 16)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample pads with 0; shift to [0, 2] so that the padding is the background (-1 after shifting back).
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def calibrate_batch_norm(model, processor, images: torch.Tensor) -> None:
    """Set the batch-norm running statistics of an untrained network to the train split's (one pass, no
    gradient, no weight changes), so that its features have unit scale instead of shrinking through the
    randomly initialized layers; the convolution weights stay random."""
    size = _input_size(processor)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.train()
    for batch in images.split(256):
        model(pixel_values=to_pixel_values(batch, size))
    model.eval()


def train_classifier(name, model, processor, feature_fn, args, train, val):
    """Train ``model`` as a digit classifier; returns figures (final loss, validation accuracy)."""
    x_train, y_train = train
    x_val, y_val = val
    size = _input_size(processor)
    head = None
    if feature_fn is not None:  # backbone + linear head on the pooled feature that load_encoder reads
        with torch.no_grad():
            dim = feature_fn(model, to_pixel_values(x_train[:2], size)).shape[-1]
        head = nn.Linear(dim, NUM_CLASSES)

    def logits_of(x):
        pixel_values = to_pixel_values(x, size)
        if head is None:
            return model(pixel_values=pixel_values).logits
        return head(feature_fn(model, pixel_values))

    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    from diffusers.optimization import get_cosine_schedule_with_warmup

    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, args.lr_warmup_steps, args.train_steps)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    losses, start = [], time.time()
    for step in range(1, args.train_steps + 1):
        idx = torch.randint(0, len(x_train), (args.train_batch_size,), generator=generator)
        loss = F.cross_entropy(logits_of(augment(x_train[idx], generator)), y_train[idx], label_smoothing=0.1)
        clipped_step(loss, params, optimizer, lr_scheduler, 1.0)
        losses.append(loss.item())
        if step % 250 == 0 or step == args.train_steps:
            print(f"[{name}] step {step} loss {sum(losses[-250:]) / len(losses[-250:]):.4f} {time.time() - start:.0f}s", flush=True)
    model.eval()
    with torch.no_grad():
        val_acc = (logits_of(x_val).argmax(-1) == y_val).float().mean().item()
        train_acc = (logits_of(x_train).argmax(-1) == y_train).float().mean().item()
    return {
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "train_accuracy": round(train_acc, 4),
        "validation_accuracy": round(val_acc, 4),
        "train_time_s": round(time.time() - start, 1),
    }


# ----------------------------------------------------------------------------------------------- stats


def compute_stats(names, encoders_dir: Path, stats_dir: Path) -> dict:
    """ReferenceStats of every encoder on the train split, through ``load_encoder(<folder>)`` and
    ``fd_onestep.dataset_stats`` (the user's code path), from the exact float images the teacher was trained
    on; ``validation_fd`` = FD of the validation split against them. Returns figures per encoder."""
    from fd_onestep.dataset_stats import (
        CLASS_STATS_SUFFIX,
        accumulate_moments,
        compute_class_conditional_stats,
        compute_reference_stats,
        iter_array_batches,
        save_reference_stats,
    )
    from fd_onestep.encoders import load_encoder

    encoders = {name: load_encoder(encoder_spec(name, encoders_dir), local_files_only=True) for name in names}
    x_train, y_train = load_digits_split("train")
    x_val, _ = load_digits_split("validation")
    stats = compute_reference_stats(
        encoders, images=x_train, batch_size=256, show_progress=False,
        source_name="sklearn load_digits via fd_onestep.demos.digits (16x16, [-1,1]), train split",
    )
    val_batches, _ = iter_array_batches(x_val, batch_size=256)
    val_moments = accumulate_moments(val_batches, encoders, show_progress=False)
    figures = {}
    for name, ref in stats.items():
        moments = val_moments[name]
        ref.validation_fd = float(ref.frechet_distance(moments.mean, moments.covariance()))
        ref.metadata["split"] = "train"
        ref.metadata["validation_split"] = "validation (fd_onestep.demos.digits.split_indices)"
        ref.metadata["validation_num_images"] = str(moments.count)
        figures[name] = {
            "encoder_id": encoders[name].encoder_id,
            "feature_dim": int(encoders[name].feature_dim),
            "num_samples": int(ref.num_samples),
            "validation_fd": ref.validation_fd,
        }
        print(f"[{name}] stats: {figures[name]}", flush=True)
    save_reference_stats(stats, stats_dir)

    # Per-class moments of the same train split (<name>.classes.safetensors): per-class FD, FJD and the joint
    # FD-loss of the class-conditional default. A pass of their own, so the marginal files above stay the
    # plain single-pass statistics.
    _, class_stats = compute_class_conditional_stats(
        encoders, images=x_train, labels=y_train, num_classes=NUM_CLASSES, batch_size=256, show_progress=False,
        source_name="sklearn load_digits via fd_onestep.demos.digits (16x16, [-1,1]), train split",
    )
    for name, ref in class_stats.items():
        ref.metadata["split"] = "train"
        figures[name]["label_embedding_scale"] = ref.alpha
        figures[name]["class_counts"] = ref.class_counts.tolist()
    save_reference_stats(class_stats, stats_dir, suffix=CLASS_STATS_SUFFIX)
    return figures


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    output_dir = Path(args.output_dir)
    record_dir = Path(args.record_dir)
    record_dir.mkdir(parents=True, exist_ok=True)
    stats_dir = Path(args.stats_dir) if args.stats_dir else output_dir.parent / "stats"
    log_path = record_dir / "encoders_training_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    # Every invocation that wrote into these assets, in order (training, then --stats_only).
    log.setdefault("commands", []).append(" ".join(["python -m fd_onestep.demos.digits.train_encoders", *sys.argv[1:]]))

    if not args.stats_only:
        train = load_digits_split("train")
        val = load_digits_split("validation")
        for offset, name in enumerate(ENCODER_NAMES):
            if name not in args.encoders or name in BUILTIN_ENCODERS:  # builtins have no weights
                continue
            torch.manual_seed(args.seed + offset)  # each model's init depends only on the seed and its name
            model, processor, feature_fn = build_model(name)
            if name == "randcnn-digits":
                calibrate_batch_norm(model, processor, train[0])
                figures = {"trained": False, "init_seed": args.seed + offset, "batch_norm": "calibrated on the train split"}
            elif name == "randconvnext-digits":  # layer norm: nothing to calibrate
                figures = {"trained": False, "init_seed": args.seed + offset}
            else:
                figures = train_classifier(name, model, processor, feature_fn, args, train, val)
                figures["trained"] = True
            figures["num_parameters"] = sum(p.numel() for p in model.parameters())
            folder = output_dir / name
            model.save_pretrained(folder, safe_serialization=True)
            processor.save_pretrained(folder)
            log.setdefault("encoders", {})[name] = figures
            print(f"[{name}] saved {folder}: {figures}", flush=True)
        write_split_metadata(output_dir.parent / "split.json")

    if not args.skip_stats:
        log.setdefault("stats", {}).update(compute_stats(args.encoders, output_dir, stats_dir))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
