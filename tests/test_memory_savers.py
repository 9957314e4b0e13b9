"""The decode's memory savers: same images, the gradient each saver promises, and the training-script flags."""

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from fd_onestep.memory_savers import (
    DecodeSavers,
    check_surrogate_fits,
    decode_in_micro_batches,
    decode_with_savers,
    surrogate_decode,
    vae_decode,
)


def tiny_vae(latent_channels=4, out_channels=3):
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=out_channels, out_channels=out_channels, latent_channels=latent_channels,
                         block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                         scaling_factor=0.5, shift_factor=0.1).eval().requires_grad_(False)


def tiny_decoder(latent_channels=4, out_channels=3):
    torch.manual_seed(1)
    return AutoencoderTiny(in_channels=out_channels, out_channels=out_channels, latent_channels=latent_channels,
                           encoder_block_out_channels=(4, 4), num_encoder_blocks=(1, 1),
                           decoder_block_out_channels=(8, 8), num_decoder_blocks=(1, 1)).eval().requires_grad_(False)


def latents(batch=5):
    torch.manual_seed(2)
    return torch.randn(batch, 4, 8, 8, requires_grad=True)


def input_grad(fn, z, weight):
    (fn(z) * weight).sum().backward()
    g = z.grad.clone()
    z.grad = None
    return g


def test_micro_batches_give_the_same_images_and_gradient():
    vae = tiny_vae()
    z = latents()
    full = vae_decode(vae, z)
    weight = torch.randn_like(full)
    chunked = decode_in_micro_batches(lambda c: vae_decode(vae, c), z, 2)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)
    g_full = input_grad(lambda x: vae_decode(vae, x), z, weight)
    g_chunk = input_grad(lambda x: decode_in_micro_batches(lambda c: vae_decode(vae, c), x, 2), z, weight)
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-4, atol=1e-5)  # batch-size-dependent float32 round-off


def test_micro_batches_keep_one_chunk_of_activations():
    # the saved tensors of a checkpointed chunked decode are its inputs only, not the decoder's activations
    vae = tiny_vae()
    z = latents(8)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decode_in_micro_batches(lambda c: vae_decode(vae, c), z, 2)
    chunked = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vae_decode(vae, z)
    assert chunked < 0.05 * sum(saved)


def test_surrogate_has_the_full_value_and_the_tiny_gradient():
    vae, tiny = tiny_vae(), tiny_decoder()
    z = latents()
    x = surrogate_decode(lambda c: vae_decode(vae, c), lambda c: vae_decode(tiny, c), z)
    # the loss sees the full decode (up to the float32 rounding of tiny + (full - tiny))
    torch.testing.assert_close(x.detach(), vae_decode(vae, z).detach(), rtol=0, atol=1e-6)
    weight = torch.randn_like(x)
    g_sur = input_grad(lambda c: surrogate_decode(lambda a: vae_decode(vae, a), lambda a: vae_decode(tiny, a), c), z, weight)
    g_tiny = input_grad(lambda c: vae_decode(tiny, c), z, weight)
    g_full = input_grad(lambda c: vae_decode(vae, c), z, weight)
    torch.testing.assert_close(g_sur, g_tiny, rtol=0, atol=0)
    assert not torch.allclose(g_sur, g_full)


def test_surrogate_keeps_no_activation_of_the_full_decoder():
    vae, tiny = tiny_vae(), tiny_decoder()
    z = latents()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        decode_with_savers(lambda c: vae_decode(vae, c), z, DecodeSavers(surrogate=tiny))
    tiny_only = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        vae_decode(tiny, z)
    assert tiny_only == sum(saved)


def test_surrogate_of_the_wrong_latents_is_refused_in_one_line():
    with pytest.raises(ValueError, match="latent / .* image channels but the teacher's VAE"):
        check_surrogate_fits(tiny_decoder(latent_channels=16), tiny_vae())


def test_generator_with_savers_gives_the_pipeline_images():
    from fd_onestep.demos import digits
    from fd_onestep.onestep import OneStepGenerator
    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

    pipe = FDOneStepPipeline.from_teacher(str(digits.TEXT_TEACHER_PATH), timestep=600, output_bound="clamp")
    gen = OneStepGenerator(pipe, prompts=["one", "two"])
    saver_gen = OneStepGenerator(pipe, prompts=["one", "two"], decode_savers=DecodeSavers(micro_batch_size=3))
    g = torch.Generator().manual_seed(0)
    noise = gen.sample_noise(7, generator=g)
    cond = gen.sample_conditioning(7, generator=g)
    with torch.no_grad():
        # chunked convolutions: batch-size-dependent float32 round-off only
        torch.testing.assert_close(saver_gen(None, noise, cond), gen(None, noise, cond), rtol=0, atol=1e-5)
