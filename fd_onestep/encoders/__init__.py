"""Feature encoders: images (N, C, H, W) in [-1, 1] -> features (N, d) float32.

``load_encoder(name_or_id)`` accepts:

- ``"inception"``: pytorch-fid's FID Inception-v3, pool3 (2048-d);
- ``"dinov2"``: ``facebook/dinov2-base``, CLS token (dgm-eval's FD_DINOv2 convention);
  ``"dinov2:<hub id or folder>"`` for another DINOv2;
- ``"siglip"``: ``google/siglip-base-patch16-224`` vision tower, pooled output;
  ``"siglip:<hub id or folder>"`` for another SigLIP/SigLIP2;
- ``"clip"``: ``openai/clip-vit-large-patch14`` vision tower, pooled output (dgm-eval's FD_CLIP model);
- ``"pixels[:size]"`` / ``"pixels-gray[:size]"``: the area-resized pixels themselves, RGB or luma (no
  weights; sees sharpness, contrast and blur, which classifier-trained encoders are built to ignore);
- any other transformers vision model hub id (``"owner/name"``) or local folder, with a pooling
  (``"cls"``, ``"mean"``, ``"pooler"``) given by ``pooling=`` or appended: ``"facebook/vit-mae-base@mean"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from .base import FeatureEncoder, check_image_range, to_rgb
from .inception import INCEPTION_ENCODER_ID, InceptionEncoder, fid_weights_cache_path
from .pixels import PIXEL_NAMES, PixelEncoder, parse_pixel_spec
from .transformers_encoders import POOLINGS, TransformersEncoder

# short name -> default hub id (transformers families); "inception" is built from pytorch-fid.
DEFAULT_MODEL_IDS = {
    "dinov2": "facebook/dinov2-base",
    "siglip": "google/siglip-base-patch16-224",
    "clip": "openai/clip-vit-large-patch14",
}
INCEPTION_NAMES = ("inception", "inception-v3", "inception-v3-fid", INCEPTION_ENCODER_ID)
KNOWN_ENCODERS = ("inception", *DEFAULT_MODEL_IDS, *PIXEL_NAMES)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32, "no": None, "none": None}


def parse_dtype(value) -> Optional[torch.dtype]:
    """``torch.dtype``, None, or a string ("bf16", "fp16", "fp32", "no") -> ``torch.dtype`` or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower()
    if key not in _DTYPES:
        raise ValueError(f"Unknown dtype {value!r}; use one of {sorted(_DTYPES)}.")
    return _DTYPES[key]


# The digits demo's bundled encoders (fd_onestep.demos.digits, which imports this package): read from the folder.
_DIGITS_ENCODERS_DIR = Path(__file__).resolve().parent.parent / "demos" / "digits" / "assets" / "encoders"


def _bundled_digits_encoders() -> str:
    names = sorted(p.name for p in _DIGITS_ENCODERS_DIR.iterdir() if p.is_dir()) if _DIGITS_ENCODERS_DIR.is_dir() else []
    folders = ", ".join(names)
    return (f"; the digits demo's bundled encoders are folders: {folders} under {_DIGITS_ENCODERS_DIR} (pass the "
            "folder's path), and pixels-digits is 'pixels-gray:16'") if names else ""


def _unknown_encoder_error(name: str) -> ValueError:
    return ValueError(
        f"Unknown encoder {name!r}. Known names: {', '.join(KNOWN_ENCODERS)} "
        f"(also 'dinov2:<model>', 'siglip:<model>', 'clip:<model>', 'pixels:<size>', 'pixels-gray:<size>'), "
        "or a transformers vision model "
        "hub id ('owner/name') or a local model folder, optionally with '@cls', '@mean' or '@pooler'"
        f"{_bundled_digits_encoders()}."
    )


def check_encoder_name(name_or_id: str) -> None:
    """Raise the unknown-encoder ``ValueError`` for a name :func:`load_encoder` would refuse, loading nothing."""
    if not isinstance(name_or_id, str) or not name_or_id.strip():
        raise _unknown_encoder_error(str(name_or_id))
    name = name_or_id.strip()
    if name.lower() in INCEPTION_NAMES or parse_pixel_spec(name) is not None:
        return
    model_ref = name.partition("@")[0]
    head, sep, tail = model_ref.partition(":")
    if head.lower() in DEFAULT_MODEL_IDS and (not sep or tail):
        return
    if not (Path(model_ref).expanduser().exists() or "/" in model_ref):
        raise _unknown_encoder_error(name)


def expected_encoder_id(name_or_id: str) -> tuple[Optional[str], Optional[str]]:
    """What statistics made with the encoder ``name_or_id`` carry, known without loading it:
    ``(full encoder id or None, model part of the id or None)``.

    Inception and pixel encoders have fixed ids; a transformers encoder's id is
    ``"{family}:{model}:{pooling}:{input size}"``, of which only the model part is known before loading.
    """
    from .transformers_encoders import _model_stable_name

    check_encoder_name(name_or_id)
    name = name_or_id.strip()
    if name.lower() in INCEPTION_NAMES:
        return INCEPTION_ENCODER_ID, None
    pixel_spec = parse_pixel_spec(name)
    if pixel_spec is not None:
        return PixelEncoder(pixel_spec[1], grayscale=pixel_spec[0]).encoder_id, None
    model_ref = name.partition("@")[0]
    head, sep, tail = model_ref.partition(":")
    if head.lower() in DEFAULT_MODEL_IDS and (not sep or tail):
        model_ref = tail if sep else DEFAULT_MODEL_IDS[head.lower()]
    return None, _model_stable_name(model_ref)


def load_encoder(
    name_or_id: str,
    *,
    device: Optional[torch.device | str] = None,
    torch_dtype: Optional[torch.dtype | str] = None,
    pooling: Optional[str] = None,
    gradient_checkpointing: bool = False,
    autocast_dtype: Optional[torch.dtype | str] = None,
    local_files_only: Optional[bool] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    weights_path: Optional[str | os.PathLike] = None,
    input_size: Optional[int] = None,
    encoder_id: Optional[str] = None,
) -> FeatureEncoder:
    """Build a frozen :class:`FeatureEncoder`.

    Args:
        name_or_id: see the module docstring.
        device, torch_dtype: where and in which dtype to keep the weights.
        pooling: "cls" | "mean" | "pooler" for transformers models (default per model type).
        gradient_checkpointing: recompute activations in backward (saves memory when training
            through the encoder).
        autocast_dtype: torch.bfloat16 / torch.float16 (or "bf16"/"fp16") autocast for the forward.
        local_files_only: never download (default: the HF_HUB_OFFLINE environment variable).
        cache_dir: HF cache directory for transformers models.
        weights_path: local FID Inception weights file (inception only).
        input_size: override the network input resolution (transformers models only; changes the id).
        encoder_id: override the stable id stored with reference statistics.
    """
    check_encoder_name(name_or_id)
    torch_dtype = parse_dtype(torch_dtype)
    autocast_dtype = parse_dtype(autocast_dtype)
    if autocast_dtype == torch.float32:
        autocast_dtype = None
    name = name_or_id.strip()

    if name.lower() in INCEPTION_NAMES:
        if pooling not in (None, "pool3"):
            raise ValueError(f"The inception encoder has one feature definition (pool3); got pooling={pooling!r}.")
        if input_size not in (None, 299) or encoder_id is not None:
            raise ValueError(
                "The inception encoder is pytorch-fid's FID network at 299x299 with the fixed id "
                f"'{INCEPTION_ENCODER_ID}'; drop input_size/encoder_id."
            )
        return InceptionEncoder(
            weights_path=weights_path,
            local_files_only=local_files_only,
            gradient_checkpointing=gradient_checkpointing,
            autocast_dtype=autocast_dtype,
            torch_dtype=torch_dtype,
            device=device,
        )
    pixel_spec = parse_pixel_spec(name)
    if pixel_spec is not None:
        if any(v is not None for v in (pooling, input_size, encoder_id, weights_path, torch_dtype, autocast_dtype)):
            raise ValueError(
                f"the pixel encoder {name!r} has no weights, pooling or id to set; give its side length in "
                "the name instead ('pixels:32', 'pixels-gray:16')."
            )
        grayscale, size = pixel_spec
        return PixelEncoder(size, grayscale=grayscale).to(device or "cpu")
    if weights_path is not None:
        raise ValueError(
            "weights_path applies to the inception encoder only; transformers models load from a "
            "hub id or a local folder passed as the encoder name."
        )

    model_ref, _, pooling_suffix = name.partition("@")
    if pooling_suffix:
        if pooling is not None and pooling != pooling_suffix:
            raise ValueError(f"Conflicting poolings: {name!r} and pooling={pooling!r}.")
        pooling = pooling_suffix
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"Unknown pooling {pooling!r}; choose one of {POOLINGS}.")

    family, model_id = None, model_ref
    head, sep, tail = model_ref.partition(":")
    if head.lower() in DEFAULT_MODEL_IDS and (not sep or tail):
        family = head.lower()
        model_id = tail if sep else DEFAULT_MODEL_IDS[family]

    return TransformersEncoder(
        model_id,
        family=family,
        pooling=pooling,
        device=device,
        torch_dtype=torch_dtype,
        gradient_checkpointing=gradient_checkpointing,
        autocast_dtype=autocast_dtype,
        local_files_only=local_files_only,
        cache_dir=cache_dir,
        input_size=input_size,
        encoder_id=encoder_id,
    )


def encoder_file_stem(name: str) -> str:
    """A file-name-safe short form of an encoder name.

    ``"dinov2"`` -> ``"dinov2"``, ``"facebook/dinov2-small"`` -> ``"facebook_dinov2-small"``, a local
    folder -> its base name, ``"<folder>@mean"`` -> ``"<base name>_mean"``,
    ``"dinov2:<folder>"`` -> ``"dinov2_<base name>"``.
    """
    base, _, pooling = name.strip().partition("@")
    head, sep, tail = base.partition(":")
    prefix = ""
    if sep and head.lower() in DEFAULT_MODEL_IDS and tail:
        prefix, base = head.lower() + "_", tail
    base = base.rstrip("/\\")
    path = Path(base).expanduser()
    if path.exists():
        base = path.resolve().name
    stem = prefix + base + (f"_{pooling}" if pooling else "")
    for ch in '/\\:@ ':
        stem = stem.replace(ch, "_")
    return stem


__all__ = [
    "DEFAULT_MODEL_IDS",
    "FeatureEncoder",
    "INCEPTION_ENCODER_ID",
    "InceptionEncoder",
    "KNOWN_ENCODERS",
    "POOLINGS",
    "PixelEncoder",
    "TransformersEncoder",
    "check_encoder_name",
    "check_image_range",
    "encoder_file_stem",
    "expected_encoder_id",
    "fid_weights_cache_path",
    "load_encoder",
    "parse_dtype",
    "to_rgb",
]
