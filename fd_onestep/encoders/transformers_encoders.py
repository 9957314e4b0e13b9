"""Encoders built from transformers vision models (DINOv2, SigLIP/SigLIP2, CLIP, MAE, ViT, ...).

Models load with ``from_pretrained`` from a hub id (or the HF cache) or a local folder. The input
resolution and normalization come from the model's image processor config
(``preprocessor_config.json``, read with ``AutoImageProcessor``); without one we fall back to the
model config's ``image_size`` and ImageNet mean/std.

Resizing happens in torch (``F.interpolate``, differentiable). It differs from the image
processors on purpose:

- the whole image is resized to ``input_size x input_size`` (processors that resize the shortest
  edge and then center-crop, e.g. DINOv2's 256 -> crop 224, would discard the borders of a square
  generated image; dgm-eval's FD_DINOv2 likewise resizes straight to 224);
- processors resize uint8 PIL images / torchvision tensors and round to uint8; we interpolate
  float tensors with ``antialias=True`` (PIL-like filter support when downsampling) and do not
  quantize or clamp (values may overshoot [-1, 1] slightly after bicubic interpolation).

On an image already at ``input_size`` no resize happens and the normalization equals the
processor's (rescale to [0, 1], then ``(x - mean) / std``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from .base import FeatureEncoder, resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

POOLINGS = ("cls", "mean", "pooler")

# model_type -> (family name, default pooling). Families decide conventions, see _family_defaults.
_DEFAULT_POOLING = {
    "dinov2": "cls",
    "dinov2_with_registers": "cls",
    "dinov3_vit": "cls",
    "siglip": "pooler",
    "siglip_vision_model": "pooler",
    "siglip2": "pooler",
    "siglip2_vision_model": "pooler",
    "clip": "pooler",
    "clip_vision_model": "pooler",
    "vit": "cls",
    "vit_mae": "cls",
    "vit_msn": "cls",
    "deit": "cls",
    "beit": "pooler",
    "data2vec-vision": "pooler",
}

_RESAMPLE_TO_MODE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "area", 5: "bilinear"}


def _hf_help(model_id: str) -> str:
    return (
        f"Provide the weights of '{model_id}' in one of these ways:\n"
        f"  - a local folder with config.json, the weights (*.safetensors) and preprocessor_config.json "
        f"(e.g. from `model.save_pretrained(folder)` and `processor.save_pretrained(folder)`), passed as the "
        f"encoder name/path, or\n"
        f"  - the Hugging Face cache: on a connected machine run `huggingface-cli download {model_id}` "
        f"(or `hf download {model_id}`) and copy the cache directory ($HF_HOME/hub, default "
        f"~/.cache/huggingface/hub) to this machine, or pass cache_dir=/--cache_dir, or\n"
        f"  - go online (unset HF_HUB_OFFLINE) so that from_pretrained can download it."
    )


def _load_error(model_id: str, err: BaseException) -> RuntimeError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    exc_type = FileNotFoundError if isinstance(err, (OSError, EnvironmentError)) else RuntimeError
    return exc_type(f"Could not load the encoder model '{model_id}' ({type(err).__name__}: {first_line}).\n" + _hf_help(model_id))


def _hub_kwargs(local_files_only: Optional[bool], cache_dir: Optional[str | os.PathLike]) -> dict:
    kwargs = {}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    return kwargs


def _size_of(size) -> Optional[int]:
    if size is None:
        return None
    if isinstance(size, int):
        return size
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    height, width = get("height"), get("width")
    if height is not None:
        if width is not None and width != height:
            # Square inputs only: use the larger side, the model interpolates positions if needed.
            return max(int(height), int(width))
        return int(height)
    if get("shortest_edge") is not None:
        return int(get("shortest_edge"))
    return None


def _resample_mode(resample, default: str) -> str:
    if resample is None:
        return default
    value = getattr(resample, "value", resample)
    if isinstance(value, str):  # torchvision InterpolationMode
        return {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "nearest-exact": "nearest-exact"}.get(
            value, default
        )
    try:
        return _RESAMPLE_TO_MODE.get(int(value), default)
    except (TypeError, ValueError):
        return default


def read_processor_settings(
    model_id: str, config, *, hub_kwargs: dict, default_mode: str = "bicubic"
) -> dict:
    """Input size, mean/std, rescale factor and resize mode from the model's image processor config.

    Returns a dict with keys ``input_size`` (int), ``mean`` and ``std`` (3-tuples, in [0, 1] pixel
    units), ``resize_mode`` (an ``F.interpolate`` mode) and ``source`` (where they came from).
    """
    processor = None
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_id, **hub_kwargs)
    except Exception:  # no preprocessor_config.json: fall back to the model config
        processor = None
    vision_config = getattr(config, "vision_config", None) or config
    config_size = getattr(vision_config, "image_size", None)
    if isinstance(config_size, (list, tuple)):
        config_size = max(config_size)
    settings = {
        "input_size": int(config_size) if config_size else 224,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "resize_mode": default_mode,
        "source": "model config defaults (no image processor config found)",
    }
    if processor is None:
        return settings
    size = None
    if getattr(processor, "do_center_crop", False):
        size = _size_of(getattr(processor, "crop_size", None))
    if size is None:
        size = _size_of(getattr(processor, "size", None))
    if size is not None:
        settings["input_size"] = size
    if getattr(processor, "do_normalize", True) and getattr(processor, "image_mean", None) is not None:
        mean, std = processor.image_mean, processor.image_std
        if isinstance(mean, (int, float)):
            mean, std = (mean,) * 3, (std,) * 3
        settings["mean"], settings["std"] = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    elif not getattr(processor, "do_normalize", True):
        settings["mean"], settings["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    settings["resize_mode"] = _resample_mode(getattr(processor, "resample", None), default_mode)
    settings["source"] = f"{type(processor).__name__} of {model_id}"
    return settings


def _model_class_for(config):
    """The transformers class that yields the vision features for this config.

    Vision-language checkpoints (CLIP, SigLIP, ...) load only their vision tower, e.g.
    ``SiglipVisionModel.from_pretrained`` on a full SigLIP checkpoint.
    """
    from transformers import MODEL_MAPPING, AutoModel

    vision_config = getattr(config, "vision_config", None)
    if vision_config is not None:
        try:
            return MODEL_MAPPING[type(vision_config)]
        except KeyError:
            pass
    return AutoModel


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~", ".\\")) or model_id.count("/") > 1 or "\\" in model_id


def _model_stable_name(model_id: str) -> str:
    """The model part of an encoder id: the hub id, or a local folder's name (paths are not stable)."""
    path = Path(model_id).expanduser()
    if path.exists():
        return path.resolve().name
    return model_id


class TransformersEncoder(FeatureEncoder):
    """A transformers vision model as a :class:`FeatureEncoder`.

    Features (N, d) are taken from the model output by ``pooling``:

    - ``"cls"``: ``last_hidden_state[:, 0]`` (after the model's final layernorm, as transformers
      returns it; for DINOv2 this is dgm-eval's FD_DINOv2 feature);
    - ``"mean"``: mean of ``last_hidden_state`` over all tokens (or over H, W for conv nets);
    - ``"pooler"``: ``pooler_output`` (SigLIP: the attention-pooling head; CLIP: post-layernorm CLS).

    Args:
        model_id: hub id or local folder.
        family: ``"dinov2"``, ``"siglip"``, ``"clip"`` or ``None`` (generic); fixes conventions that
            the family's reference implementation uses (DINOv2: bicubic resize, ImageNet mean/std).
        pooling: one of ``POOLINGS``, or None for the model type's default.
        encoder_id: override of the stable id (default ``"{family}:{model}:{pooling}:{input_size}"``,
            where model is the hub id or a local folder's base name).
    """

    antialias = True

    def __init__(
        self,
        model_id: str,
        *,
        family: Optional[str] = None,
        pooling: Optional[str] = None,
        device: Optional[torch.device | str] = None,
        torch_dtype: Optional[torch.dtype] = None,
        gradient_checkpointing: bool = False,
        autocast_dtype: Optional[torch.dtype] = None,
        local_files_only: Optional[bool] = None,
        cache_dir: Optional[str | os.PathLike] = None,
        input_size: Optional[int] = None,
        encoder_id: Optional[str] = None,
        check_inputs: bool = True,
    ):
        super().__init__(autocast_dtype=autocast_dtype, check_inputs=check_inputs)
        from transformers import AutoConfig

        hub_kwargs = _hub_kwargs(local_files_only, cache_dir)
        self.model_id = str(model_id)
        if _looks_like_path(self.model_id) and not Path(self.model_id).expanduser().exists():
            raise FileNotFoundError(
                f"The encoder model folder '{self.model_id}' does not exist. Pass an existing folder "
                "(saved with save_pretrained) or a hub id such as 'facebook/dinov2-base'.\n" + _hf_help(self.model_id)
            )
        try:
            config = AutoConfig.from_pretrained(self.model_id, **hub_kwargs)
        except Exception as err:
            raise _load_error(self.model_id, err) from None
        model_type = getattr(config, "model_type", "")
        vision_type = getattr(getattr(config, "vision_config", None), "model_type", None)
        if family is None:
            family = model_type.split("_")[0] if model_type else "hf"
            family = {"dinov2": "dinov2", "siglip": "siglip", "siglip2": "siglip", "clip": "clip"}.get(family, family)
        if pooling is None:
            pooling = _DEFAULT_POOLING.get(model_type) or _DEFAULT_POOLING.get(vision_type or "") or "pooler"
        if pooling not in POOLINGS:
            raise ValueError(f"Unknown pooling {pooling!r} for '{model_id}'; choose one of {POOLINGS}.")
        self.pooling = pooling
        self.family = family

        model_cls = _model_class_for(config)
        load_kwargs = dict(hub_kwargs)
        if torch_dtype is not None:
            load_kwargs["dtype"] = torch_dtype
        if model_type == "vit_mae":
            # MAE masks 75% of the patches at random by default; features need the full image.
            load_kwargs["mask_ratio"] = 0.0
        try:
            model = model_cls.from_pretrained(self.model_id, **load_kwargs)
        except Exception as err:
            raise _load_error(self.model_id, err) from None
        self.model = model

        settings = read_processor_settings(self.model_id, config, hub_kwargs=hub_kwargs)
        if family == "dinov2":
            # dgm-eval's FD_DINOv2 convention: bicubic resize to 224, ImageNet mean/std.
            settings["resize_mode"] = "bicubic"
        if input_size is not None:
            settings["input_size"] = int(input_size)
        self.input_size = int(settings["input_size"])
        self.resize_mode = settings["resize_mode"]
        self.processor_source = settings["source"]
        self.register_buffer("mean", torch.tensor(settings["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(settings["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(
                    f"{type(model).__name__} ('{model_id}') does not support gradient checkpointing; "
                    "load it with gradient_checkpointing=False."
                )
            enable({"use_reentrant": False})
        self.to(device=device)
        self._freeze()

        with torch.no_grad():
            probe = torch.zeros(1, 3, self.input_size, self.input_size, device=self.device, dtype=self.dtype)
            self.feature_dim = int(self._pool(probe).shape[-1])
        self.name = family
        self.encoder_id = encoder_id or f"{family}:{_model_stable_name(self.model_id)}:{pooling}:{self.input_size}"

    def _after_train_mode(self) -> None:
        # transformers only checkpoints layers whose own `training` flag is set. Setting it on the
        # checkpointed layers alone keeps dropout etc. (their submodules) in eval mode.
        if getattr(self, "gradient_checkpointing", False):
            for module in self.model.modules():
                if getattr(module, "gradient_checkpointing", False) is True:
                    module.training = True

    def describe_preprocessing(self) -> str:
        mean = ",".join(f"{m:.4g}" for m in self.mean.flatten().tolist())
        std = ",".join(f"{s:.4g}" for s in self.std.flatten().tolist())
        return (
            f"RGB [-1,1] -> [0,1] -> {self.resize_mode} resize to {self.input_size}x{self.input_size} "
            f"(torch, antialias={self.antialias}) -> (x-mean)/std mean=({mean}) std=({std}); pooling={self.pooling}"
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1) / 2
        x = resize(x, self.input_size, self.resize_mode, self.antialias)
        return (x - self.mean) / self.std

    def _pool(self, pixels: torch.Tensor) -> torch.Tensor:
        outputs = self.model(pixel_values=pixels)
        if self.pooling == "pooler":
            pooled = getattr(outputs, "pooler_output", None)
            if pooled is None:
                raise ValueError(
                    f"'{self.model_id}' ({type(self.model).__name__}) has no pooler_output; "
                    "use pooling='cls' or pooling='mean'."
                )
            return pooled.flatten(1)
        hidden = outputs.last_hidden_state
        if hidden.ndim == 4:  # conv nets: (N, C, H, W)
            if self.pooling == "cls":
                raise ValueError(
                    f"'{self.model_id}' is a convolutional model without a CLS token; use pooling='mean' or 'pooler'."
                )
            return hidden.mean(dim=(2, 3))
        if self.pooling == "cls":
            return hidden[:, 0]
        return hidden.mean(dim=1)

    def extract(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._pool(pixels)


def hf_families() -> Sequence[str]:
    return ("dinov2", "siglip", "clip")
