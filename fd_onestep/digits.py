"""The bundled offline digits data set and the paths of the assets trained on it.

scikit-learn ships ``load_digits`` (1,797 grayscale 8x8 handwritten digits, pixel values 0..16) with the
package, so it is available on a fresh offline machine. fd-onestep's offline default (the digits teacher,
the digit encoders and their reference statistics under ``fd_onestep/assets/digits/``) is built on it.

Conventions used everywhere in this module:

- images are float32 tensors (N, 1, R, R) in [-1, 1] (diffusers' convention), R = 16 by default: the 8x8
  originals are upscaled with bilinear interpolation (``align_corners=False``) after mapping 0..16 to [-1, 1];
- the train/validation split is fixed: stratified by class, ``VALIDATION_SIZE`` = 360 images held out with
  ``random_state=SPLIT_SEED`` (scikit-learn ``train_test_split``), 1,437 for training. It never changes,
  because the bundled reference statistics (train split) and their ``validation_fd`` (validation split vs
  train statistics, for FD_r) were computed on it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DIGITS_ASSETS_DIR",
    "DIGITS_RESOLUTION",
    "NUM_CLASSES",
    "SPLIT_SEED",
    "VALIDATION_SIZE",
    "TEACHER_PATH",
    "CLASS_TEACHER_PATH",
    "NULL_CLASS_LABEL",
    "TEXT_TEACHER_PATH",
    "TEXT_TEACHER_TINY_DECODER_PATH",
    "DIGIT_WORDS",
    "TRAINING_PHRASINGS",
    "HELD_OUT_PHRASINGS",
    "digit_prompt",
    "digit_prompts",
    "BUILTIN_ENCODERS",
    "ENCODERS_DIR",
    "STATS_DIR",
    "SPLIT_METADATA_PATH",
    "TRAINING_ENCODERS",
    "HELD_OUT_ENCODERS",
    "CLASSIFIER_NAME",
    "encoder_path",
    "encoder_spec",
    "stats_path",
    "class_stats_path",
    "split_indices",
    "load_digits_split",
    "digits_dataset",
    "split_metadata",
    "load_digit_classifier",
    "classify_digits",
    "class_histogram",
    "load_bundled_encoders",
    "load_bundled_references",
    "load_digits_teacher",
]

DIGITS_ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "digits"
TEACHER_PATH = DIGITS_ASSETS_DIR / "teacher"
# The class-conditional teacher: UNet2DModel with num_class_embeds = NUM_CLASSES + 1, the last one the null
# class (the label of dropped conditioning in training), used by classifier-free guidance.
CLASS_TEACHER_PATH = DIGITS_ASSETS_DIR / "teacher-class"
# The text-conditional teacher: a StableDiffusionPipeline (UNet2DConditionModel, a small AutoencoderKL, a small
# CLIP text encoder and tokenizer) whose prompts name the digit.
TEXT_TEACHER_PATH = DIGITS_ASSETS_DIR / "teacher-text"
# Its tiny decoder (AutoencoderTiny, distilled by train_scripts/train_tiny_decoder.py): the surrogate decoder of
# `--surrogate_decoder` (docs/memory_savers.md).
TEXT_TEACHER_TINY_DECODER_PATH = DIGITS_ASSETS_DIR / "teacher-text-tiny-decoder"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# How a prompt names digit c: {word} is DIGIT_WORDS[c], {numeral} is str(c). The held-out phrasings are never
# trained on; they combine only words that the training phrasings use, in new ways.
TRAINING_PHRASINGS = ("{word}", "the digit {word}", "a handwritten {word}", "the number {numeral}", "a {numeral}")
HELD_OUT_PHRASINGS = ("a handwritten digit {word}", "the handwritten number {numeral}")
ENCODERS_DIR = DIGITS_ASSETS_DIR / "encoders"
STATS_DIR = DIGITS_ASSETS_DIR / "stats"
SPLIT_METADATA_PATH = DIGITS_ASSETS_DIR / "split.json"

DIGITS_RESOLUTION = 16
NUM_CLASSES = 10
SPLIT_SEED = 0
VALIDATION_SIZE = 360
NULL_CLASS_LABEL = NUM_CLASSES
_NUM_DIGITS = 1797  # images in sklearn's load_digits

# Encoders used in the default training loss, and representations that are only ever used to evaluate.
TRAINING_ENCODERS = ("dinov2-digits", "siglip-digits", "pixels-digits")
HELD_OUT_ENCODERS = ("resnet-digits", "randcnn-digits")
# ResNetForImageClassification trained on the digits train split; its backbone is "resnet-digits".
CLASSIFIER_NAME = "resnet-digits"

Split = Literal["train", "validation", "all"]


# Bundled representations without weights: name -> the load_encoder spec that builds them.
BUILTIN_ENCODERS = {"pixels-digits": "pixels-gray:16"}


def encoder_spec(name: str, encoders_dir: Path | str | None = None) -> str:
    """What to pass to ``load_encoder`` for a bundled digits encoder: its folder (the bundled one, checked to
    exist, or ``encoders_dir / name``), or a builtin spec."""
    if name in BUILTIN_ENCODERS:
        return BUILTIN_ENCODERS[name]
    return str(encoder_path(name) if encoders_dir is None else Path(encoders_dir) / name)


def encoder_path(name: str) -> Path:
    """Folder of a bundled digits encoder (``save_pretrained`` layout), e.g. ``encoder_path("dinov2-digits")``."""
    path = ENCODERS_DIR / name
    if not path.is_dir():
        known = sorted(p.name for p in ENCODERS_DIR.iterdir()) if ENCODERS_DIR.is_dir() else []
        raise FileNotFoundError(
            f"no bundled digits encoder named {name!r} under {ENCODERS_DIR}; known: {known}. "
            "Use one of those names, or rebuild the assets with train_scripts/train_digits_encoders.py."
        )
    return path


def stats_path(name: str) -> Path:
    """ReferenceStats file (safetensors) of a bundled digits encoder on the digits train split."""
    path = STATS_DIR / f"{name}.safetensors"
    if not path.is_file():
        known = sorted(p.stem for p in STATS_DIR.glob("*.safetensors") if "." not in p.stem) if STATS_DIR.is_dir() else []
        raise FileNotFoundError(
            f"no bundled digits reference statistics for {name!r} ({path}); known: {known}. "
            "Use one of those names, or recompute them with train_scripts/train_digits_encoders.py --stats_only."
        )
    return path


def class_stats_path(name: str) -> Path:
    """Per-class statistics (``ClassConditionalStats``, ``<name>.classes.safetensors``) of a bundled digits
    encoder on the digits train split: per-class FD, FJD and the joint FD-loss."""
    from .dataset_stats import CLASS_STATS_SUFFIX

    path = STATS_DIR / f"{name}{CLASS_STATS_SUFFIX}"
    if not path.is_file():
        raise FileNotFoundError(
            f"no bundled per-class digits statistics for {name!r} ({path}); recompute them with "
            "train_scripts/train_digits_encoders.py --stats_only."
        )
    return path


def digit_prompt(label: int, phrasing: str) -> str:
    """The prompt that names digit ``label`` (0-9) in ``phrasing`` (e.g. "the digit {word}" -> "the digit seven")."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"a digit is 0-9, got {label}.")
    return phrasing.format(word=DIGIT_WORDS[int(label)], numeral=str(int(label)))


def digit_prompts(labels, phrasings=TRAINING_PHRASINGS, generator: torch.Generator | None = None) -> list[str]:
    """One prompt per label (an int64 tensor or a list of 0-9), each in a phrasing drawn uniformly from
    ``phrasings`` with ``generator``."""
    labels = torch.as_tensor(labels).reshape(-1)
    picks = torch.randint(len(phrasings), (labels.numel(),), generator=generator)
    return [digit_prompt(int(c), phrasings[int(i)]) for c, i in zip(labels, picks)]


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    if images.shape[0] != _NUM_DIGITS:
        raise RuntimeError(
            f"scikit-learn's load_digits returned {images.shape[0]} images, expected {_NUM_DIGITS}; "
            "the fixed digits split assumes the standard data set: reinstall scikit-learn."
        )
    return images, labels


@lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = _raw_digits()
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)),
        test_size=VALIDATION_SIZE,
        stratify=labels,
        random_state=SPLIT_SEED,
        shuffle=True,
    )
    return np.sort(train_idx), np.sort(val_idx)


def split_indices(split: Split) -> np.ndarray:
    """Indices into sklearn's ``load_digits`` of a split: "train" (1437), "validation" (360) or "all" (1797).

    Returns a sorted int64 array (a copy: callers may modify it).
    """
    train_idx, val_idx = _split_indices()
    if split == "train":
        return train_idx.copy()
    if split == "validation":
        return val_idx.copy()
    if split == "all":
        return np.arange(_NUM_DIGITS)
    raise ValueError(f"unknown digits split {split!r}: use 'train', 'validation' or 'all'.")


def _upscale(images_0_16: np.ndarray, resolution: int) -> torch.Tensor:
    x = torch.from_numpy(images_0_16).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.clamp_(-1.0, 1.0).contiguous()


def load_digits_split(split: Split = "train", resolution: int = DIGITS_RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits of one split as ``(images, labels)``.

    Returns:
        images: float32 (N, 1, resolution, resolution) in [-1, 1] (ink is +1, background -1).
        labels: int64 (N,) digit classes 0..9.
    """
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an int >= 8 (the originals are 8x8), got {resolution!r}.")
    images, labels = _raw_digits()
    idx = split_indices(split)
    return _upscale(images[idx], resolution), torch.from_numpy(labels[idx].copy())


def digits_dataset(split: Split = "train", resolution: int = DIGITS_RESOLUTION):
    """The split as a ``datasets.Dataset`` with columns ``image`` (PIL, mode "L", resolution^2) and ``label``
    (``ClassLabel`` with names "0".."9"), the layout image data sets on the Hub use.

    PIL pixels are ``round((x + 1) * 127.5)`` of the float images, so they are quantized to uint8.
    """
    import datasets

    from .images import tensor_to_pil

    images, labels = load_digits_split(split, resolution)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(NUM_CLASSES)])}
    )
    return datasets.Dataset.from_dict(
        {"image": tensor_to_pil(images, keep_grayscale=True), "label": labels.tolist()},
        features=features,
        split=datasets.Split.TRAIN if split == "train" else datasets.Split.VALIDATION if split == "validation" else None,
    )


def split_metadata() -> dict:
    """JSON-serializable description of the fixed split (what ``assets/digits/split.json`` holds)."""
    train_idx, val_idx = _split_indices()
    _, labels = _raw_digits()
    return {
        "source": "sklearn.datasets.load_digits",
        "num_images": int(_NUM_DIGITS),
        "resolution": DIGITS_RESOLUTION,
        "channels": 1,
        "value_range": [-1.0, 1.0],
        "preprocessing": "pixels 0..16 -> x/8-1, bilinear upscale 8x8 -> 16x16 (align_corners=False), clamp [-1,1]",
        "split": {
            "method": "sklearn.model_selection.train_test_split(stratify=labels, shuffle=True)",
            "random_state": SPLIT_SEED,
            "validation_size": VALIDATION_SIZE,
            "train_size": int(len(train_idx)),
        },
        "train_class_counts": np.bincount(labels[train_idx], minlength=NUM_CLASSES).tolist(),
        "validation_class_counts": np.bincount(labels[val_idx], minlength=NUM_CLASSES).tolist(),
        "validation_indices": val_idx.tolist(),
    }


def load_digits_teacher(device: str | torch.device | None = None):
    """The bundled teacher: ``DDPMPipeline.from_pretrained(TEACHER_PATH)`` (v-prediction, zero terminal SNR)."""
    from diffusers import DDPMPipeline

    if not (TEACHER_PATH / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the bundled digits teacher is missing ({TEACHER_PATH}); reinstall fd-onestep or rebuild it with "
            "train_scripts/train_digits_teacher.py --output_dir fd_onestep/assets/digits/teacher."
        )
    pipeline = DDPMPipeline.from_pretrained(TEACHER_PATH, local_files_only=True)
    return pipeline.to(device) if device is not None else pipeline


def load_bundled_encoders(names=TRAINING_ENCODERS + HELD_OUT_ENCODERS, device=None, **kwargs) -> dict:
    """``{name: load_encoder(<bundled folder>)}``: the user's code path, on the bundled folders."""
    from .encoders import load_encoder

    kwargs.setdefault("local_files_only", True)
    return {name: load_encoder(encoder_spec(name), device=device, **kwargs) for name in names}


def load_bundled_references(names=TRAINING_ENCODERS + HELD_OUT_ENCODERS) -> dict:
    """``{name: ReferenceStats}`` of the bundled encoders on the digits train split (with validation_fd)."""
    from .reference_stats import ReferenceStats

    return {name: ReferenceStats.load(stats_path(name)) for name in names}


# --------------------------------------------------------------------------------------------------------
# The bundled digit classifier and class histograms.


def load_digit_classifier(path: str | Path | None = None, device: str | torch.device | None = None):
    """The bundled ``ResNetForImageClassification`` digit classifier (or one at ``path``), in eval mode.

    Loaded with ``AutoModelForImageClassification`` / ``AutoImageProcessor``: the same folders a user
    would point transformers at. Returns ``(model, image_processor)``.
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    folder = Path(path) if path is not None else encoder_path(CLASSIFIER_NAME)
    model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
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
def classify_digits(images: torch.Tensor, classifier=None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify digit images.

    Args:
        images: float (N, 1 or 3, H, W) in [-1, 1].
        classifier: ``(model, image_processor)`` from ``load_digit_classifier``; the bundled one if None.
    Returns:
        ``(predictions int64 (N,), confidences float32 (N,))``: argmax class and its softmax probability.
    """
    model, processor = classifier if classifier is not None else load_digit_classifier()
    device = next(model.parameters()).device
    preds, confs = [], []
    for start in range(0, images.shape[0], batch_size):
        x = _processor_input(images[start : start + batch_size].to(device), processor, model.config.num_channels)
        probs = model(pixel_values=x).logits.float().softmax(-1)
        conf, pred = probs.max(-1)
        preds.append(pred.cpu())
        confs.append(conf.cpu())
    return torch.cat(preds), torch.cat(confs)


def digit_label_predictor(classifier) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images float (B, C, H, W) in [-1, 1] -> predicted classes int64 (B,)`` from a ``(model,
    image_processor)`` classifier of :func:`load_digit_classifier`, applied by :func:`classify_digits`."""
    return lambda images: classify_digits(images, classifier)[0]


def class_histogram(images: torch.Tensor, classifier=None, batch_size: int = 256) -> dict:
    """Class histogram of generated digits under the digit classifier.

    Args:
        images: float (N, C, H, W) in [-1, 1].
    Returns:
        dict with ``counts`` (list of 10 ints), ``frequencies`` (10 floats summing to 1),
        ``max_abs_deviation`` (max over classes of |freq - 0.1|, absolute), ``max_relative_deviation``
        (max over classes of |freq - 0.1| / 0.1, e.g. 0.15 = every class within 15% of uniform),
        ``classes_present`` (how many classes got at least one sample), ``mean_confidence`` and
        ``num_samples``.
    """
    preds, confs = classify_digits(images, classifier, batch_size)
    counts = torch.bincount(preds, minlength=NUM_CLASSES)[:NUM_CLASSES]
    freqs = counts.double() / max(int(counts.sum()), 1)
    uniform = 1.0 / NUM_CLASSES
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


def write_split_metadata(path: str | Path = SPLIT_METADATA_PATH) -> Path:
    """Write ``split_metadata()`` as JSON (used by the asset scripts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split_metadata(), indent=1) + "\n")
    return path
