"""The sharding library's single-process parts: each family's FSDP2 blocks, the gathered copy, no-op without a world."""

import pytest
import torch
from tiny_teachers import TEACHERS

from fd_onestep.training.sharding import denoiser_block_classes, enable_fsdp2, full_state_dict, unsharded_denoiser

BLOCKS = {"unet2d": ["ResnetBlock2D", "Attention"], "dit": ["BasicTransformerBlock"],
          "sd": ["BasicTransformerBlock", "ResnetBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
          "sdxl": ["BasicTransformerBlock", "ResnetBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
          "sd3": ["JointTransformerBlock"], "flux": ["FluxTransformerBlock", "FluxSingleTransformerBlock"],
          "sana": ["SanaTransformerBlock", "PatchEmbed", "SanaModulatedNorm"]}


@pytest.mark.parametrize("family", sorted(BLOCKS))
def test_every_family_names_the_blocks_its_denoiser_is_sharded_by(family):
    """The adapter's block_classes where diffusers has no _no_split_modules (UNet2DModel, DiT), else diffusers' own."""
    teacher = TEACHERS[family]()
    denoiser = getattr(teacher, "unet", None) or teacher.transformer
    assert denoiser_block_classes(denoiser) == BLOCKS[family]


def test_the_gathered_copy_of_a_denoiser_is_a_plain_diffusers_model_with_its_weights(tmp_path):
    torch.manual_seed(0)
    denoiser = TEACHERS["flux"]().transformer
    copy = unsharded_denoiser(denoiser, full_state_dict(denoiser))
    assert type(copy) is type(denoiser)
    for key, value in denoiser.state_dict().items():
        assert torch.equal(copy.state_dict()[key], value), key
    copy.save_pretrained(tmp_path / "transformer")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_one_process_is_never_sharded():
    from types import SimpleNamespace

    # a stand-in accelerator: a real one would fix accelerate's process-wide state for the other tests
    assert enable_fsdp2(SimpleNamespace(num_processes=1), TEACHERS["unet2d"]().unet) is False
