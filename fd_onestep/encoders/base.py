"""The common interface of all feature encoders.

A :class:`FeatureEncoder` maps images as diffusers produces them -- float tensors (N, C, H, W) in
[-1, 1] -- to features (N, d) float32. Everything between (channel conversion, resizing to the
network's input resolution, the network's own normalization) happens inside torch, so gradients
reach the input pixels: FD-loss backpropagates through the encoder into the generator.

The network's weights are frozen (``requires_grad=False``) and kept in eval mode even when a
parent module calls ``.train()``: an encoder is a fixed measuring instrument, not a trainable part.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

# Inputs whose magnitude exceeds this are not in [-1, 1]: a generator's output may overshoot a
# little (no final clamp, bicubic ringing), but a value above 2 means another convention
# (typically [0, 255]).
RANGE_TOLERANCE = 2.0


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Bring (N, C, H, W) images to 3 channels.

    - C == 3: returned as is.
    - C == 1 (grayscale): repeated to RGB, as PIL's ``convert("RGB")`` does.
    - C == 4 (RGBA): the alpha channel is dropped, as PIL's ``convert("RGB")`` (and therefore
      pytorch-fid's image loader) does. Generated images have no meaningful alpha.

    Any other channel count raises ``ValueError``.
    """
    if images.ndim != 4:
        raise ValueError(
            f"Expected images of shape (N, C, H, W), got shape {tuple(images.shape)}. "
            "Add a batch dimension with images.unsqueeze(0) for a single image, or permute "
            "channels-last arrays with images.permute(0, 3, 1, 2)."
        )
    channels = images.shape[1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    if channels == 4:
        return images[:, :3]
    raise ValueError(
        f"Expected 1 (grayscale), 3 (RGB) or 4 (RGBA) channels in dimension 1 of (N, C, H, W), "
        f"got {channels} channels (shape {tuple(images.shape)}). If the images are channels-last "
        "(N, H, W, C), permute them with images.permute(0, 3, 1, 2)."
    )


def check_image_range(images: torch.Tensor) -> None:
    """Raise ``ValueError`` for NaN/Inf values or values far outside [-1, 1].

    Costs one device synchronisation (two reductions) per call.
    """
    if not torch.is_floating_point(images):
        raise TypeError(
            f"Expected a float tensor in [-1, 1], got dtype {images.dtype}. Convert uint8 images "
            "with images.float() / 127.5 - 1."
        )
    if images.numel() == 0:
        raise ValueError(f"Got an empty image batch of shape {tuple(images.shape)}; pass at least one image.")
    detached = images.detach()
    if not bool(torch.isfinite(detached).all()):
        raise ValueError(
            "Images contain NaN or Inf values. Check the generator's output (e.g. a diverged model, "
            "fp16 overflow) before encoding; the encoder expects finite images in [-1, 1]."
        )
    lo, hi = torch.aminmax(detached.float())
    lo, hi = float(lo), float(hi)
    if hi > RANGE_TOLERANCE or lo < -RANGE_TOLERANCE:
        hint = (
            "They look like [0, 255] pixel values: convert with images / 127.5 - 1."
            if lo >= -RANGE_TOLERANCE and hi <= 255.0 + 1e-3
            else "Rescale them to [-1, 1] (the diffusers convention) first."
        )
        raise ValueError(
            f"Images must be float tensors in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]. {hint} "
            "Images in [0, 1] (e.g. a pipeline's output_type='pt') convert with images * 2 - 1."
        )


def resize(images: torch.Tensor, size: int, mode: str, antialias: bool) -> torch.Tensor:
    """Differentiable resize of (N, C, H, W) images to (N, C, size, size).

    Skipped when the images already have that size (interpolation to the same size is the
    identity for every mode, but costs a kernel launch and memory).
    """
    if images.shape[-2:] == (size, size):
        return images
    kwargs = {}
    if mode in ("bilinear", "bicubic"):
        kwargs["align_corners"] = False
        kwargs["antialias"] = antialias
    return F.interpolate(images, size=(size, size), mode=mode, **kwargs)


class FeatureEncoder(torch.nn.Module):
    """Frozen image encoder: images (N, C, H, W) in [-1, 1] -> features (N, d) float32.

    Attributes:
        name: short human-readable name (``"inception"``, ``"dinov2"``, ...).
        feature_dim: d, the length of one feature vector.
        input_size: side length in pixels of the square input the network sees after resizing.
        encoder_id: stable identifier of (network, weights, feature definition, input size),
            stored in :class:`~fd_onestep.reference_stats.ReferenceStats` metadata so that
            statistics are only ever compared with features from the same encoder.
        resize_mode, antialias: how inputs are resized to ``input_size`` (``F.interpolate``).
        check_inputs: validate range/finiteness on every call (one device sync); on by default.

    Subclasses implement :meth:`preprocess` (resize + the network's normalization, on RGB images
    in [-1, 1]) and :meth:`extract` (the network on preprocessed pixels -> (N, d)).
    """

    name: str
    feature_dim: int
    input_size: int
    encoder_id: str
    resize_mode: str = "bilinear"
    antialias: bool = False

    def __init__(self, *, autocast_dtype: Optional[torch.dtype] = None, check_inputs: bool = True):
        super().__init__()
        if autocast_dtype is not None and autocast_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast_dtype must be torch.bfloat16, torch.float16 or None, got {autocast_dtype!r}."
            )
        self.autocast_dtype = autocast_dtype
        self.check_inputs = check_inputs

    # -- subclass hooks -------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images (N, 3, H, W) in [-1, 1] -> network input (N, 3, input_size, input_size)."""
        raise NotImplementedError

    def extract(self, pixels: torch.Tensor) -> torch.Tensor:
        """Network input -> features (N, d) (any float dtype)."""
        raise NotImplementedError

    def describe_preprocessing(self) -> str:
        """One line describing the input pipeline, stored in reference-stat metadata."""
        return f"{self.resize_mode} resize to {self.input_size} (antialias={self.antialias})"

    # -- common machinery -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        # Always eval: dropout/batch-norm statistics would make features depend on the batch.
        super().train(False)
        self._after_train_mode()
        return self

    def _after_train_mode(self) -> None:
        """Hook for subclasses that need per-module flags re-applied after ``train()``."""

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            images: float tensor (N, C, H, W), C in {1, 3, 4}, values in [-1, 1], any H, W.
        Returns:
            float32 tensor (N, feature_dim), differentiable w.r.t. ``images``.
        """
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"Expected a torch.Tensor (N, C, H, W) in [-1, 1], got {type(images).__name__}. "
                "Convert PIL images / numpy arrays with fd_onestep.images.to_tensor_batch."
            )
        images = to_rgb(images)
        if self.check_inputs:
            check_image_range(images)
        device = self.device
        x = images.to(device=device, dtype=torch.float32)
        x = self.preprocess(x)
        if self.autocast_dtype is None:
            x = x.to(self.dtype)
        with self._autocast(device):
            features = self.extract(x)
        features = features.float()
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise RuntimeError(
                f"{self.name} produced features of shape {tuple(features.shape)}, expected "
                f"(N, {self.feature_dim}). This is a bug in the encoder wrapper; please report it."
            )
        return features

    def extra_repr(self) -> str:
        return f"encoder_id={self.encoder_id!r}, feature_dim={self.feature_dim}, input_size={self.input_size}"
