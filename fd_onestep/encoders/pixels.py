"""Raw pixels as a representation: FD of the pixel distribution itself.

Classifier-trained encoders are built to ignore what does not change the class, such as stroke
sharpness, contrast and blur, and FD-loss trained only through them can leave those wrong. The pixel
representation sees them directly. It has no weights: ``load_encoder("pixels:32")`` (RGB) or
``load_encoder("pixels-gray:16")`` (luma). Images are area-resized (average pooling, antialiased) to the
given side, which should divide the image side. The feature is the flattened result in [-1, 1], of
dimension ``3 * size^2`` or ``size^2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import FeatureEncoder

__all__ = ["PIXEL_NAMES", "PixelEncoder", "parse_pixel_spec"]

PIXEL_NAMES = ("pixels", "pixels-gray")
DEFAULT_PIXEL_SIZE = 32
# ITU-R BT.601 luma, the weights PIL's convert("L") uses
_LUMA = (0.299, 0.587, 0.114)


def parse_pixel_spec(name: str) -> tuple[bool, int] | None:
    """``"pixels[-gray][:size]"`` -> ``(grayscale, size)``; None when ``name`` is not a pixel spec."""
    head, sep, tail = name.strip().partition(":")
    if head.lower() not in PIXEL_NAMES:
        return None
    size = DEFAULT_PIXEL_SIZE
    if sep:
        if not tail.isdigit() or int(tail) < 1:
            raise ValueError(
                f"bad pixel encoder {name!r}: the part after ':' is the side length in pixels, e.g. 'pixels:32'."
            )
        size = int(tail)
    return head.lower() == "pixels-gray", size


class PixelEncoder(FeatureEncoder):
    """Images (N, C, H, W) in [-1, 1] -> area-resized pixels, flattened: (N, size^2 [* 3]) float32."""

    resize_mode = "area"
    antialias = True

    def __init__(self, size: int = DEFAULT_PIXEL_SIZE, *, grayscale: bool = False, check_inputs: bool = True):
        super().__init__(check_inputs=check_inputs)
        self.grayscale = bool(grayscale)
        self.input_size = int(size)
        self.feature_dim = self.input_size**2 * (1 if self.grayscale else 3)
        self.name = "pixels-gray" if self.grayscale else "pixels"
        self.encoder_id = f"{self.name}:{self.input_size}"
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.luma.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.adaptive_avg_pool2d(images, self.input_size)
        if self.grayscale:
            images = (images * self.luma.to(images.dtype)).sum(1, keepdim=True)
        return images

    def extract(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1)

    def describe_preprocessing(self) -> str:
        return f"area resize (average pooling) to {self.input_size}; {'BT.601 luma' if self.grayscale else 'RGB'}; [-1, 1]"
