"""Tiny, randomly initialised encoders saved like the real ones -- for tests and offline demos.

They load through exactly the code paths of the real weights (``from_pretrained`` on a folder with
``config.json`` + ``model.safetensors`` + ``preprocessor_config.json``; the FID weights file in a
torch.hub cache), but their features mean nothing: never report numbers computed with them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _save_tiny(model_cls, config, processor, folder, seed: int) -> Path:
    """``model_cls(config)`` with weights drawn from ``seed``, saved with its image processor into ``folder``."""
    torch.manual_seed(seed)
    folder = Path(folder)
    model_cls(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _tiny_vit_config(config_cls, *, image_size: int, hidden_size: int, patch_size: int):
    """A 2-layer, 2-head ViT-style config of ``hidden_size`` width (MLP 2x)."""
    return config_cls(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=2 * hidden_size, patch_size=patch_size, image_size=image_size)


def save_tiny_dinov2(folder: str | os.PathLike, *, image_size: int = 224, hidden_size: int = 32, seed: int = 0) -> Path:
    """A 2-layer DINOv2 (patch 14) with a DINOv2-style ``BitImageProcessor`` at ``image_size``."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    processor = BitImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        resample=3,  # bicubic, as facebook/dinov2-*
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    config = _tiny_vit_config(Dinov2Config, image_size=image_size, hidden_size=hidden_size, patch_size=14)
    return _save_tiny(Dinov2Model, config, processor, folder, seed)


def save_tiny_siglip(folder: str | os.PathLike, *, image_size: int = 32, hidden_size: int = 32, seed: int = 0) -> Path:
    """A 2-layer SigLIP vision tower (patch 8) with a ``SiglipImageProcessor`` at ``image_size``."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    config = _tiny_vit_config(SiglipVisionConfig, image_size=image_size, hidden_size=hidden_size, patch_size=8)
    return _save_tiny(SiglipVisionModel, config, processor, folder, seed)


def random_fid_inception_state_dict(seed: int = 0) -> dict:
    """A state dict with the FID Inception-v3's keys and shapes, random He-scaled conv weights.

    The FID network's blocks subclass torchvision's, so torchvision's ``inception_v3`` with 1008
    classes and no aux head has the same parameter names. He scaling keeps pool3 features O(1).
    """
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    state = net.state_dict()
    for key, value in state.items():
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn_like(value) * (2.0 / fan_in) ** 0.5
    return state


def save_random_fid_inception_weights(torch_home: str | os.PathLike, seed: int = 0) -> Path:
    """Write random FID Inception weights as ``<torch_home>/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``.

    With ``TORCH_HOME=torch_home`` both pytorch-fid's loader and ours find the file without network.
    """
    from .inception import fid_weights_filename

    path = Path(torch_home) / "hub" / "checkpoints" / fid_weights_filename()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_fid_inception_state_dict(seed), path)
    return path
