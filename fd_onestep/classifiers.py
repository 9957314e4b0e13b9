"""Hugging Face image classifiers as label predictors: adherence of conditional generators and class histograms.

Any ``transformers`` image-classification folder or Hub id (``AutoModelForImageClassification`` with its
``AutoImageProcessor``) classifies generated images exactly as its image processor would prepare them, done in
torch on ``[-1, 1]`` tensors (diffusers' convention), so no PIL round trip.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "load_image_classifier",
    "processor_input_size",
    "classify_images",
    "label_predictor",
    "class_histogram",
]


def load_image_classifier(path: str | os.PathLike, device: str | torch.device | None = None, **kwargs):
    """``(model, image_processor)`` of a transformers image classifier (local folder or Hub id), in eval mode.

    Loaded with ``AutoModelForImageClassification`` / ``AutoImageProcessor``; ``kwargs`` go to both
    ``from_pretrained`` calls (``local_files_only``, ``cache_dir``, ``revision``).
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(path, **kwargs)
    processor = AutoImageProcessor.from_pretrained(path, **kwargs)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, processor


def processor_input_size(processor) -> tuple[int, int]:
    """(height, width) an image processor feeds its model: the center crop if it crops, else the resize."""

    def field(size, key):
        if size is None:
            return None
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    sizes = [getattr(processor, "crop_size", None)] if getattr(processor, "do_center_crop", False) else []
    for size in sizes + [getattr(processor, "size", None)]:
        height, width = field(size, "height"), field(size, "width")
        if height and width:
            return int(height), int(width)
        if field(size, "shortest_edge"):
            return int(field(size, "shortest_edge")), int(field(size, "shortest_edge"))
    raise ValueError(
        f"cannot tell the input size of image processor {type(processor).__name__}: give it size "
        "{'height', 'width'} or {'shortest_edge'} (and crop_size when do_center_crop)."
    )


def _processor_input(images: torch.Tensor, processor, num_channels: int) -> torch.Tensor:
    """[-1, 1] (N, C, H, W) -> the classifier's input, done in torch exactly as its image processor would:
    gray -> RGB, bilinear resize to the processor's crop/size, (x01 - mean) / std."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}.")
    from diffusers.image_processor import VaeImageProcessor

    x = VaeImageProcessor.denormalize(images.float())  # [-1, 1] -> [0, 1], clamped
    if x.shape[1] == 1 and num_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != num_channels:
        raise ValueError(
            f"the classifier takes {num_channels}-channel images, got {x.shape[1]} channels; "
            "pass grayscale (1) or RGB (3) images in [-1, 1]."
        )
    height, width = processor_input_size(processor)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(processor.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def classify_images(images: torch.Tensor, classifier, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify images.

    Args:
        images: float (N, 1 or 3, H, W) in [-1, 1].
        classifier: ``(model, image_processor)`` from :func:`load_image_classifier`.
    Returns:
        ``(predictions int64 (N,), confidences float32 (N,))``: argmax class and its softmax probability.
    """
    model, processor = classifier
    device = next(model.parameters()).device
    preds, confs = [], []
    for start in range(0, images.shape[0], batch_size):
        x = _processor_input(images[start : start + batch_size].to(device), processor, model.config.num_channels)
        probs = model(pixel_values=x).logits.float().softmax(-1)
        conf, pred = probs.max(-1)
        preds.append(pred.cpu())
        confs.append(conf.cpu())
    return torch.cat(preds), torch.cat(confs)


def label_predictor(classifier) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images float (B, C, H, W) in [-1, 1] -> predicted classes int64 (B,)`` from a ``(model,
    image_processor)`` classifier of :func:`load_image_classifier`, applied by :func:`classify_images`."""
    return lambda images: classify_images(images, classifier)[0]


def class_histogram(images: torch.Tensor, classifier, num_classes: int | None = None, batch_size: int = 256) -> dict:
    """Class histogram of generated images under an image classifier, against the uniform distribution.

    Args:
        images: float (N, C, H, W) in [-1, 1].
        classifier: ``(model, image_processor)`` from :func:`load_image_classifier`.
        num_classes: classes counted (default: the classifier's ``num_labels``).
    Returns:
        dict with ``counts`` (list of ``num_classes`` ints), ``frequencies`` (floats summing to 1),
        ``max_abs_deviation`` (max over classes of |freq - 1/C|, absolute), ``max_relative_deviation``
        (max over classes of |freq - 1/C| * C, e.g. 0.15 = every class within 15% of uniform),
        ``classes_present`` (how many classes got at least one sample), ``mean_confidence`` and
        ``num_samples``.
    """
    num_classes = num_classes or classifier[0].config.num_labels
    preds, confs = classify_images(images, classifier, batch_size)
    counts = torch.bincount(preds, minlength=num_classes)[:num_classes]
    freqs = counts.double() / max(int(counts.sum()), 1)
    uniform = 1.0 / num_classes
    deviation = (freqs - uniform).abs()
    return {
        "num_samples": int(preds.numel()),
        "counts": counts.tolist(),
        "frequencies": [round(float(f), 6) for f in freqs],
        "max_abs_deviation": float(deviation.max()),
        "max_relative_deviation": float(deviation.max() / uniform),
        "classes_present": int((counts > 0).sum()),
        "mean_confidence": float(confs.mean()) if confs.numel() else float("nan"),
    }
