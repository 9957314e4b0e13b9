"""Tiny, offline diffusers teachers for every supported family (built from configs, no downloads).

The builders here are imported by the other pipeline / one-step / LoRA test files; the tests in this
file pin that the teachers are the real diffusers pipelines (they run their own multi-step sampler) and
stay tiny enough for CI on 2 cores.
"""

from __future__ import annotations

import string

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

CLIP_MAX_LENGTH = 12
T5_MAX_LENGTH = 8


# ---------------------------------------------------------------------------------------- text
def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A real CLIP BPE tokenizer over lower-case letters (each char a token, word ends as ``x</w>``)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = [("a", "b"), ("c", "a")]  # a couple of real merges so the BPE path is exercised
    vocab["ab"] = len(vocab)
    vocab["ca"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = CLIP_MAX_LENGTH
    return tok


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A real T5 (unigram) tokenizer over lower-case letters and '▁'-prefixed letters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits]
    pieces += [("▁" + c, -1.0) for c in string.ascii_lowercase + string.digits] + [("▁", -3.0)]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = T5_MAX_LENGTH
    return tok


def _clip_config(vocab_size: int, hidden: int = 16, projection: int = 16) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_t5_encoder(vocab_size: int, d_model: int = 32) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=1, num_heads=2,
                 relative_attention_num_buckets=8, decoder_start_token_id=0)
    ).eval()


def tiny_vae(latent_channels: int = 4, **kwargs) -> AutoencoderKL:
    """AutoencoderKL with 2 levels (vae_scale_factor 2), RGB."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        **kwargs,
    ).eval()


# ---------------------------------------------------------------------------------------- families
def tiny_unet2d(num_class_embeds: int | None = None, out_channels: int = 1, sample_size: int = 16) -> UNet2DModel:
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=out_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()


def ddpm_teacher(prediction_type: str = "v_prediction", zero_snr: bool = True, num_class_embeds=None) -> DDPMPipeline:
    """The offline default's shape: a v-prediction zero-terminal-SNR DDPMPipeline at 16x16, 1 channel."""
    scheduler = DDPMScheduler(prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    return DDPMPipeline(unet=tiny_unet2d(num_class_embeds), scheduler=scheduler)


def dit_teacher(prediction_type: str = "epsilon", num_classes: int = 10) -> DiTPipeline:
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes, norm_num_groups=4,
    ).eval()
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    return DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=scheduler)


def sd_teacher(prediction_type: str = "epsilon", zero_snr: bool = False) -> StableDiffusionPipeline:
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer))).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    ).eval()
    scheduler = DDPMScheduler(
        prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr, beta_schedule="scaled_linear",
        beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False,
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def sd3_teacher(with_t5: bool = True, shift: float = 3.0) -> StableDiffusion3Pipeline:
    tok1, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    te1 = CLIPTextModelWithProjection(_clip_config(len(tok1))).eval()
    te2 = CLIPTextModelWithProjection(_clip_config(len(tok2))).eval()
    tok3 = tiny_t5_tokenizer() if with_t5 else None
    te3 = tiny_t5_encoder(len(tok3)) if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=8,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=tiny_vae(shift_factor=0.1),
        text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3,
    )


def flux_teacher(guidance_embeds: bool = False) -> FluxPipeline:
    tok = tiny_clip_tokenizer()
    te = CLIPTextModel(_clip_config(len(tok))).eval()
    tok2 = tiny_t5_tokenizer()
    te2 = tiny_t5_encoder(len(tok2))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5,
        max_shift=1.15,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=tiny_vae(shift_factor=0.1), text_encoder=te, tokenizer=tok, text_encoder_2=te2,
        tokenizer_2=tok2, transformer=transformer,
    )


TEACHERS = {
    "unet2d": ddpm_teacher,
    "dit": dit_teacher,
    "sd": sd_teacher,
    "sd3": sd3_teacher,
    "flux": flux_teacher,
}
# flux needs an explicit (small) latent size: its config has none and FluxPipeline defaults to 128
FAMILY_KWARGS = {"flux": {"sample_size": 8, "max_sequence_length": T5_MAX_LENGTH},
                 "sd3": {"max_sequence_length": T5_MAX_LENGTH}}


# ---------------------------------------------------------------------------------------- tests
def test_clip_tokenizer_is_a_real_bpe_tokenizer_padding_to_max_length():
    tok = tiny_clip_tokenizer()
    ids = tok(["a cab", "zz"], padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True).input_ids
    assert all(len(row) == CLIP_MAX_LENGTH for row in ids)
    assert ids[0][0] == tok.bos_token_id and tok.eos_token_id in ids[0]
    assert tok.tokenize("cab") == ["ca", "b</w>"]  # the BPE merge "c a" applied


def test_t5_tokenizer_appends_eos_and_pads():
    tok = tiny_t5_tokenizer()
    ids = tok(["a dog"], padding="max_length", max_length=T5_MAX_LENGTH, truncation=True).input_ids[0]
    assert len(ids) == T5_MAX_LENGTH and tok.eos_token_id in ids and ids[-1] == tok.pad_token_id


@pytest.mark.parametrize("family", list(TEACHERS))
def test_tiny_teachers_are_tiny(family):
    torch.manual_seed(0)
    pipe = TEACHERS[family]()
    total = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    assert total < 600_000, f"{family} teacher has {total} parameters; keep CI models tiny"


def test_tiny_ddpm_teacher_runs_its_own_multistep_sampler():
    pipe = ddpm_teacher()
    image = pipe(batch_size=1, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 1)
