"""Specification of the transformers-based feature encoders (DINOv2, SigLIP, any vision model).

Tiny models are built from configs and saved with ``save_pretrained`` together with their image
processor config, then loaded by path through the same ``load_encoder`` code as hub ids.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from fd_onestep.encoders import FeatureEncoder, load_encoder
from fd_onestep.encoders.testing import save_tiny_dinov2, save_tiny_siglip


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("models") / "tiny-dinov2")


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return save_tiny_siglip(tmp_path_factory.mktemp("models") / "tiny-siglip")


@pytest.fixture(scope="module")
def dinov2(dinov2_dir):
    return load_encoder(f"dinov2:{dinov2_dir}")


@pytest.fixture(scope="module")
def siglip(siglip_dir):
    return load_encoder(f"siglip:{siglip_dir}")


def _random_images(n, size, channels=3):
    return torch.rand(n, channels, size, size) * 2 - 1


# --- interface ---------------------------------------------------------------------------------


def test_encoders_expose_name_dim_input_size_and_stable_id(dinov2, siglip):
    assert isinstance(dinov2, FeatureEncoder)
    assert (dinov2.name, dinov2.feature_dim, dinov2.input_size) == ("dinov2", 32, 224)
    assert dinov2.encoder_id == "dinov2:tiny-dinov2:cls:224"
    assert (siglip.name, siglip.feature_dim, siglip.input_size) == ("siglip", 32, 32)
    assert siglip.encoder_id == "siglip:tiny-siglip:pooler:32"


def test_local_folder_without_family_prefix_detects_the_model_type(dinov2_dir, siglip_dir):
    assert load_encoder(str(dinov2_dir)).encoder_id == "dinov2:tiny-dinov2:cls:224"
    assert load_encoder(str(siglip_dir)).encoder_id == "siglip:tiny-siglip:pooler:32"


def test_features_are_float32_with_one_row_per_image(dinov2, siglip):
    for encoder in (dinov2, siglip):
        features = encoder(_random_images(3, 48))
        assert features.shape == (3, 32) and features.dtype == torch.float32


def test_encoder_weights_are_frozen_and_stay_in_eval_mode(dinov2):
    assert all(not p.requires_grad for p in dinov2.parameters())
    dinov2.train()
    assert not dinov2.training and not dinov2.model.training


# --- feature definitions -----------------------------------------------------------------------


def test_dinov2_feature_is_cls_token_of_last_hidden_state_at_224_bicubic(dinov2):
    images = _random_images(2, 64)
    with torch.no_grad():
        x = torch.nn.functional.interpolate((images + 1) / 2, size=(224, 224), mode="bicubic", antialias=True)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        expected = dinov2.model(pixel_values=(x - mean) / std).last_hidden_state[:, 0]
        assert torch.allclose(dinov2(images), expected, atol=1e-6)


def test_siglip_feature_is_pooled_output_of_the_vision_tower(siglip):
    images = _random_images(2, 32)
    with torch.no_grad():
        expected = siglip.model(pixel_values=images).pooler_output  # mean = std = 0.5: [-1,1] as is
        assert torch.allclose(siglip(images), expected, atol=1e-6)


def test_pooling_can_be_chosen_by_argument_or_suffix(dinov2_dir):
    images = _random_images(2, 224)
    mean_pooled = load_encoder(f"{dinov2_dir}@mean")
    assert mean_pooled.encoder_id == "dinov2:tiny-dinov2:mean:224"
    with torch.no_grad():
        hidden = mean_pooled.model(pixel_values=mean_pooled.preprocess(images)).last_hidden_state
        assert torch.allclose(mean_pooled(images), hidden.mean(dim=1), atol=1e-6)
    assert load_encoder(str(dinov2_dir), pooling="pooler").encoder_id == "dinov2:tiny-dinov2:pooler:224"
    with pytest.raises(ValueError, match="pooling"):
        load_encoder(str(dinov2_dir), pooling="max")


@pytest.mark.parametrize("family_dir, processor_name", [("dinov2_dir", "BitImageProcessor"), ("siglip_dir", "SiglipImageProcessor")])
def test_normalization_matches_the_models_own_image_processor_at_its_resolution(request, family_dir, processor_name):
    from transformers import AutoImageProcessor

    folder = request.getfixturevalue(family_dir)
    encoder = load_encoder(str(folder))
    processor = AutoImageProcessor.from_pretrained(folder)
    assert processor_name in type(processor).__name__
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(encoder.input_size, encoder.input_size, 3), dtype=np.uint8)
    expected = processor(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    ours = encoder.preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1e-3


# --- gradients and memory options ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["dinov2", "siglip"])
def test_gradients_reach_the_input_pixels(request, which):
    encoder = request.getfixturevalue(which)
    images = _random_images(2, 40).requires_grad_(True)
    features = encoder(images)
    (features**2).sum().backward()
    assert images.grad is not None and images.grad.shape == images.shape
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())


def test_gradient_checkpointing_gives_the_same_features_and_gradients(dinov2_dir):
    plain = load_encoder(str(dinov2_dir))
    checkpointed = load_encoder(str(dinov2_dir), gradient_checkpointing=True)
    layers = [m for m in checkpointed.model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert layers and all(m.training for m in layers)  # transformers checkpoints only "training" layers

    grads = []
    for encoder in (plain, checkpointed):
        torch.manual_seed(1)
        images = (torch.rand(2, 3, 56, 56) * 2 - 1).requires_grad_(True)
        (encoder(images) ** 2).sum().backward()
        grads.append(images.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_returns_float32_features_close_to_full_precision(siglip_dir):
    full = load_encoder(str(siglip_dir))
    autocast = load_encoder(str(siglip_dir), autocast_dtype="bf16")
    images = _random_images(4, 32)
    with torch.no_grad():
        a, b = full(images), autocast(images)
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.1 * a.abs().max()


# --- channels and bad inputs --------------------------------------------------------------------


def test_grayscale_images_are_converted_to_rgb_not_rejected(siglip):
    gray = _random_images(2, 32, channels=1)
    with torch.no_grad():
        assert torch.allclose(siglip(gray), siglip(gray.repeat(1, 3, 1, 1)))


def test_rgba_images_drop_alpha_like_pil_convert_rgb(siglip):
    rgba = _random_images(2, 32, channels=4)
    with torch.no_grad():
        assert torch.allclose(siglip(rgba), siglip(rgba[:, :3]))


def test_other_channel_counts_are_rejected_with_a_permute_hint(siglip):
    with pytest.raises(ValueError, match=r"permute\(0, 3, 1, 2\)"):
        siglip(_random_images(2, 32).permute(0, 2, 3, 1))


def test_nan_images_raise_a_clear_error(siglip):
    images = _random_images(2, 32)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        siglip(images)


def test_images_in_0_255_passed_as_minus1_1_raise_a_clear_error_naming_the_fix(siglip):
    images = torch.randint(0, 256, (2, 3, 32, 32)).float()
    with pytest.raises(ValueError, match=r"\[0, 255\].*images / 127\.5 - 1"):
        siglip(images)


def test_uint8_tensors_are_rejected_with_the_conversion(siglip):
    with pytest.raises(TypeError, match="127.5"):
        siglip(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))


def test_unknown_encoder_name_lists_the_known_names():
    with pytest.raises(ValueError, match=r"Unknown encoder 'dinov3000'.*inception, dinov2, siglip"):
        load_encoder("dinov3000")


def test_offline_hub_id_gives_a_clear_error_naming_the_model_and_how_to_provide_it(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: the model is neither cached nor downloadable.
    with pytest.raises(FileNotFoundError) as info:
        load_encoder("dinov2", cache_dir=tmp_path)
    message = str(info.value)
    assert "facebook/dinov2-base" in message
    assert "huggingface-cli download facebook/dinov2-base" in message and "local folder" in message
    assert "Traceback" not in message and info.value.__cause__ is None


def test_missing_local_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(f"dinov2:{tmp_path / 'nowhere'}")


# --- any transformers vision model ---------------------------------------------------------------


def test_clip_checkpoint_loads_only_its_vision_tower_with_pooled_output(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(tmp_path / "tiny-clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "tiny-clip")
    encoder = load_encoder(str(tmp_path / "tiny-clip"))
    assert type(encoder.model).__name__ == "CLIPVisionModel"
    assert encoder.encoder_id == "clip:tiny-clip:pooler:32" and encoder.feature_dim == 16
    images = _random_images(2, 32).requires_grad_(True)
    (encoder(images) ** 2).sum().backward()  # a plain sum of layer-normed features has zero gradient
    assert images.grad.abs().sum() > 0


def test_generic_vit_without_image_processor_uses_config_size_and_imagenet_stats(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "tiny-vit")
    encoder = load_encoder(str(tmp_path / "tiny-vit"))
    assert encoder.encoder_id == "vit:tiny-vit:cls:32" and encoder.feature_dim == 16
    assert torch.allclose(encoder.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert encoder(_random_images(2, 50)).shape == (2, 16)


# ----------------------------------------------------------------------------- pixel representation


def test_pixel_encoder_is_the_area_resized_image_flattened():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    rgb = load_encoder("pixels:16")
    assert (rgb.feature_dim, rgb.input_size, rgb.encoder_id) == (768, 16, "pixels:16")
    torch.testing.assert_close(rgb(images), torch.nn.functional.avg_pool2d(images, 2).flatten(1))
    gray = load_encoder("pixels-gray:16")
    assert (gray.feature_dim, gray.encoder_id) == (256, "pixels-gray:16")
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    torch.testing.assert_close(gray(images), torch.nn.functional.avg_pool2d(luma[:, None], 2).flatten(1))
    # one channel is the gray image itself (converted to RGB and back to luma)
    torch.testing.assert_close(gray(images[:, :1]), torch.nn.functional.avg_pool2d(images[:, :1], 2).flatten(1))
    assert load_encoder("pixels").input_size == 32


def test_pixel_encoder_passes_gradients_and_rejects_settings_it_does_not_have():
    images = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_()
    load_encoder("pixels:8")(images).square().sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    for kwargs in ({"pooling": "cls"}, {"input_size": 16}, {"weights_path": "x"}):
        with pytest.raises(ValueError, match="pixels:32"):
            load_encoder("pixels", **kwargs)
    with pytest.raises(ValueError, match="side length"):
        load_encoder("pixels:big")
    with pytest.raises(ValueError, match="NaN"):
        load_encoder("pixels")(torch.full((1, 3, 8, 8), float("nan")))
