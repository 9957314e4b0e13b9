"""The bundled offline digits data set and the paths of the assets trained on it.

scikit-learn ships ``load_digits`` (1,797 grayscale 8x8 handwritten digits, pixel values 0..16) with the
package, so it is available on a fresh offline machine. fd-onestep's offline default (the digits teacher,
the digit encoders and their reference statistics under ``fd_onestep/demos/digits/assets/``) is built on it.

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
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ...classifiers import class_histogram as _class_histogram
from ...classifiers import classify_images, load_image_classifier

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
    "CLIP_PATH",
    "clip_ranking_accuracy",
    "write_digits_text_dataset",
    "encoder_path",
    "encoder_spec",
    "stats_path",
    "class_stats_path",
    "split_indices",
    "load_digits_split",
    "digits_dataset",
    "split_metadata",
    "classifier_path",
    "load_digit_classifier",
    "classify_digits",
    "class_histogram",
    "load_bundled_encoders",
    "load_bundled_references",
    "load_digits_teacher",
]

DIGITS_ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TEACHER_PATH = DIGITS_ASSETS_DIR / "teacher"
# The class-conditional teacher: UNet2DModel with num_class_embeds = NUM_CLASSES + 1, the last one the null
# class (the label of dropped conditioning in training), used by classifier-free guidance.
CLASS_TEACHER_PATH = DIGITS_ASSETS_DIR / "teacher-class"
# The text-conditional teacher: a StableDiffusionPipeline (UNet2DConditionModel, a small AutoencoderKL, a small
# CLIP text encoder and tokenizer) whose prompts name the digit.
TEXT_TEACHER_PATH = DIGITS_ASSETS_DIR / "teacher-text"
# Its tiny decoder (AutoencoderTiny, distilled by python -m fd_onestep.demos.digits.train_tiny_decoder): the
# surrogate decoder of `--surrogate_decoder` (docs/memory_savers.md).
TEXT_TEACHER_TINY_DECODER_PATH = DIGITS_ASSETS_DIR / "teacher-text-tiny-decoder"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# How a prompt names digit c: {word} is DIGIT_WORDS[c], {numeral} is str(c). The held-out phrasings are never
# trained on; they combine only words that the training phrasings use, in new ways.
TRAINING_PHRASINGS = ("{word}", "the digit {word}", "a handwritten {word}", "the number {numeral}", "a {numeral}")
HELD_OUT_PHRASINGS = ("a handwritten digit {word}", "the handwritten number {numeral}")
# A tiny CLIPModel trained on the digits and the text teacher's phrasings (python -m
# fd_onestep.demos.digits.train_clip): the CLIP score model of the text-conditional demo (`fd-onestep evaluate
# --clip_model`).
CLIP_PATH = DIGITS_ASSETS_DIR / "clip-digits"
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
            "Use one of those names, or rebuild the assets with python -m fd_onestep.demos.digits.train_encoders."
        )
    return path


def stats_path(name: str) -> Path:
    """ReferenceStats file (safetensors) of a bundled digits encoder on the digits train split."""
    path = STATS_DIR / f"{name}.safetensors"
    if not path.is_file():
        known = sorted(p.stem for p in STATS_DIR.glob("*.safetensors") if "." not in p.stem) if STATS_DIR.is_dir() else []
        raise FileNotFoundError(
            f"no bundled digits reference statistics for {name!r} ({path}); known: {known}. "
            "Use one of those names, or recompute them with python -m fd_onestep.demos.digits.train_encoders --stats_only."
        )
    return path


def class_stats_path(name: str) -> Path:
    """Per-class statistics (``ClassConditionalStats``, ``<name>.classes.safetensors``) of a bundled digits
    encoder on the digits train split: per-class FD, FJD and the joint FD-loss."""
    from ...dataset_stats import CLASS_STATS_SUFFIX

    path = STATS_DIR / f"{name}{CLASS_STATS_SUFFIX}"
    if not path.is_file():
        raise FileNotFoundError(
            f"no bundled per-class digits statistics for {name!r} ({path}); recompute them with "
            "python -m fd_onestep.demos.digits.train_encoders --stats_only."
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

    from ...images import tensor_to_pil

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
    """JSON-serializable description of the fixed split (what ``assets/split.json`` holds)."""
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
            "python -m fd_onestep.demos.digits.train_teacher --output_dir fd_onestep/demos/digits/assets/teacher."
        )
    pipeline = DDPMPipeline.from_pretrained(TEACHER_PATH, local_files_only=True)
    return pipeline.to(device) if device is not None else pipeline


def load_bundled_encoders(names=TRAINING_ENCODERS + HELD_OUT_ENCODERS, device=None, **kwargs) -> dict:
    """``{name: load_encoder(<bundled folder>)}``: the user's code path, on the bundled folders."""
    from ...encoders import load_encoder

    kwargs.setdefault("local_files_only", True)
    return {name: load_encoder(encoder_spec(name), device=device, **kwargs) for name in names}


def load_bundled_references(names=TRAINING_ENCODERS + HELD_OUT_ENCODERS) -> dict:
    """``{name: ReferenceStats}`` of the bundled encoders on the digits train split (with validation_fd)."""
    from ...reference_stats import ReferenceStats

    return {name: ReferenceStats.load(stats_path(name)) for name in names}


# --------------------------------------------------------------------------------------------------------
# The bundled digit classifier and class histograms (the library's image-classifier code on the bundled folder).


def classifier_path() -> Path:
    """Folder of the bundled ``ResNetForImageClassification`` digit classifier (what ``--classifier`` takes)."""
    return encoder_path(CLASSIFIER_NAME)


def load_digit_classifier(path: str | Path | None = None, device: str | torch.device | None = None):
    """The bundled digit classifier (or one at ``path``): ``(model, image_processor)`` in eval mode, loaded by
    :func:`fd_onestep.classifiers.load_image_classifier` as any transformers image classifier."""
    return load_image_classifier(Path(path) if path is not None else classifier_path(), device=device,
                                 local_files_only=True)


def classify_digits(images: torch.Tensor, classifier=None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fd_onestep.classifiers.classify_images` with the bundled digit classifier unless one is given."""
    return classify_images(images, classifier if classifier is not None else load_digit_classifier(), batch_size)


def class_histogram(images: torch.Tensor, classifier=None, batch_size: int = 256) -> dict:
    """:func:`fd_onestep.classifiers.class_histogram` of ten digit classes, with the bundled digit classifier
    unless one is given."""
    classifier = classifier if classifier is not None else load_digit_classifier()
    return _class_histogram(images, classifier, NUM_CLASSES, batch_size)


def write_split_metadata(path: str | Path = SPLIT_METADATA_PATH) -> Path:
    """Write ``split_metadata()`` as JSON (used by the asset scripts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split_metadata(), indent=1) + "\n")
    return path


def clip_ranking_accuracy(images: torch.Tensor, labels, model, processor, phrasings=HELD_OUT_PHRASINGS) -> dict:
    """Does a CLIP model rank the prompt of an image's own digit above the other digits' prompts?

    Args:
        images: float (N, 1, H, W) in [-1, 1]; labels: their (N,) digits 0-9.
        model, processor: from :func:`fd_onestep.clip_score.load_clip_model` (e.g. of ``CLIP_PATH``).
        phrasings: the prompt phrasings; in each, the 10 digits' prompts are compared (cosines of the embeddings).
    Returns:
        ``{"pairwise": share of (image, phrasing, other digit) whose own prompt scores higher, "top1": share of
        (image, phrasing) whose own prompt scores highest of the 10, "num_images": N, "phrasings": [...]}``.
    """
    from ...clip_score import image_embeddings, text_embeddings

    labels = torch.as_tensor(labels).reshape(-1)
    image_embeds = F.normalize(image_embeddings(images, model, processor), dim=-1).cpu()
    beaten, top1 = 0, 0
    for phrasing in phrasings:
        prompts = [digit_prompt(c, phrasing) for c in range(NUM_CLASSES)]
        cosines = image_embeds @ F.normalize(text_embeddings(prompts, model, processor), dim=-1).cpu().T  # (N, 10)
        own = cosines.gather(1, labels[:, None])
        beaten += int((own > cosines).sum())  # the own digit never beats itself
        top1 += int((cosines.argmax(1) == labels).sum())
    n = labels.numel() * len(phrasings)
    return {"pairwise": beaten / (n * (NUM_CLASSES - 1)), "top1": top1 / n, "num_images": int(labels.numel()),
            "phrasings": list(phrasings)}


def write_digits_text_dataset(folder: str | Path, phrasings=TRAINING_PHRASINGS, seed: int = 0,
                              max_rows: int | None = None) -> Path:
    """The digits as a captioned ``imagefolder`` (what ``datasets.load_dataset(folder)`` reads): ``train/`` and
    ``validation/`` (the fixed split), each with its PNGs (mode "L") and a ``metadata.jsonl`` of ``file_name``,
    ``text`` (a prompt naming the digit in a phrasing drawn per row from ``phrasings`` with ``seed``) and ``label``.
    The input of ``fd-onestep evaluate --dataset FOLDER --caption_column text --label_column label``. Rows are in a
    seeded random order (the protocol takes the first N); ``max_rows`` keeps the first rows of each split."""
    from ...images import tensor_to_pil

    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)
    for split in ("train", "validation"):
        images, labels = load_digits_split(split)
        order = torch.randperm(len(labels), generator=generator)[:max_rows]
        images, labels = images[order], labels[order]
        prompts = digit_prompts(labels, phrasings, generator)
        (folder / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (image, label, prompt) in enumerate(zip(tensor_to_pil(images, keep_grayscale=True), labels.tolist(), prompts)):
            name = f"{i:05d}.png"
            image.save(folder / split / name)
            rows.append(json.dumps({"file_name": name, "text": prompt, "label": int(label)}))
        (folder / split / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder
