"""Tiny, offline diffusers teachers for every supported family, built from configs with random weights.

The one test helper every pipeline / one-step / LoRA / training test builds its teachers with: the real stock
pipelines (``DDPMPipeline``, ``DiTPipeline``, ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline``, ``SanaPipeline``) over models a few thousand parameters large,
with real tokenizers (CLIP BPE, T5 unigram, a Gemma-style word-level fast tokenizer built with ``tokenizers``).
``TEACHERS`` maps a family to its builder; ``FAMILY_KWARGS`` holds the one-step settings a family needs at this size.
``train_teacher`` builds the (slightly different) teachers of the training-script tests.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

CLIP_MAX_LENGTH = 12
T5_MAX_LENGTH = 8
SANA_MAX_LENGTH = 8


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


def sdxl_teacher(force_zeros_for_empty_prompt: bool = True, prediction_type: str = "epsilon",
                 force_upcast: bool = True) -> StableDiffusionXLPipeline:
    """SDXL base layout: two CLIP encoders (hidden 16 + 16 = cross-attention 32; pooled projection 16), a UNet with
    ``addition_embed_type="text_time"`` (6 time ids x 8 + 16 pooled), EulerDiscreteScheduler as SDXL ships it."""
    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    te = CLIPTextModel(_clip_config(len(tok))).eval()
    te2 = CLIPTextModelWithProjection(_clip_config(len(tok2))).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
    ).eval()
    scheduler = EulerDiscreteScheduler(
        prediction_type=prediction_type, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(force_upcast=force_upcast), text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )


GEMMA_WORDS = ("a cab dog cat red blue green square circle photo of the two cats small big house sea zzz b c "
               "digit seven three zero user prompt").split()


def tiny_gemma_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer in Gemma's conventions (<bos> first, <pad> = 0, lower-case words, <unk> for the
    rest, e.g. SanaPipeline's complex human instruction), built with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for word in GEMMA_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def tiny_gemma2(vocab_size: int, hidden: int = 16) -> Gemma2Model:
    return Gemma2Model(Gemma2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=0,
        bos_token_id=2, eos_token_id=1,
    )).eval()


def tiny_dc_vae() -> AutoencoderDC:
    """AutoencoderDC with 3 levels (vae_scale_factor 4; SanaPipeline wants images divisible by 32), 4 latent channels."""
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()


def sana_teacher(flow_shift: float = 3.0) -> SanaPipeline:
    """SANA layout: Gemma-2 text encoder (hidden 16 = caption channels), SanaTransformer2DModel, AutoencoderDC, and
    the flow-sigma DPM-Solver the real SANA checkpoints ship with."""
    tok = tiny_gemma_tokenizer()
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=16,
        sample_size=8,
    ).eval()
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=flow_shift)
    return SanaPipeline(tokenizer=tok, text_encoder=tiny_gemma2(len(tok)), vae=tiny_dc_vae(), transformer=transformer,
                        scheduler=scheduler)


TEACHERS = {
    "unet2d": ddpm_teacher,
    "dit": dit_teacher,
    "sd": sd_teacher,
    "sdxl": sdxl_teacher,
    "sd3": sd3_teacher,
    "flux": flux_teacher,
    "sana": sana_teacher,
}
# flux needs an explicit (small) latent size: its config has none and FluxPipeline defaults to 128
FAMILY_KWARGS = {"flux": {"sample_size": 8, "max_sequence_length": T5_MAX_LENGTH},
                 "sd3": {"max_sequence_length": T5_MAX_LENGTH},
                 "sana": {"max_sequence_length": SANA_MAX_LENGTH}}


# ---------------------------------------------------------------------------------------- training-script teachers
def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 8
    return tok


def _clip_text_config(vocab_size: int, hidden: int = 16):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=8, projection_dim=hidden,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)


def _unet2d(num_class_embeds=None):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds)


def train_teacher(family: str):
    """The teachers of the training-script tests (train_fixtures.build_all): a tiny multi-step diffusers pipeline
    of ``family`` ("unet2d", "unet2d_class", "dit", "sd", "sd3", "sdxl", "sana")."""
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(0)
    if family == "unet2d":
        return DDPMPipeline(unet=_unet2d(), scheduler=DDPMScheduler(prediction_type="v_prediction",
                                                                     rescale_betas_zero_snr=True))
    if family == "unet2d_class":
        return DDPMPipeline(unet=_unet2d(num_class_embeds=10),
                            scheduler=DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True))
    if family == "dit":
        from diffusers import DiTPipeline, DiTTransformer2DModel

        transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                            norm_num_groups=4)
        return DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDPMScheduler(prediction_type="epsilon"))
    if family == "sd":
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel

        tok = _clip_tokenizer()
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                    norm_num_groups=4, attention_head_dim=4)
        scheduler = DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                  beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)
        return StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_clip_text_config(len(tok))), tokenizer=tok,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       image_encoder=None, requires_safety_checker=False)
    if family == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection

        tok1, tok2 = _clip_tokenizer(), _clip_tokenizer()
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                            caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                                            pos_embed_max_size=8)
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(),
            text_encoder=CLIPTextModelWithProjection(_clip_text_config(len(tok1))), tokenizer=tok1,
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(len(tok2))), tokenizer_2=tok2,
            text_encoder_3=None, tokenizer_3=None,
        )
    if family == "sdxl":
        return sdxl_teacher()
    if family == "sana":
        return sana_teacher()
    if family in TEACHERS:  # the families added since: their one tiny teacher
        return TEACHERS[family]()
    raise ValueError(family)


# ---------------------------------------------------------------------------------------- Qwen-Image, Z-Image
QWEN_MAX_LENGTH = 16
QWEN_WORDS = ("system user assistant describe the image by detailing color shape size texture quantity text spatial "
              "relationships of objects and background a cab dog cat red blue green square circle photo two cats "
              "small big house sea zzz b c digit seven three zero prompt").split()
# Qwen2.5 / Qwen3 chat template reduced to one user turn (what ZImagePipeline renders, enable_thinking ignored)
QWEN3_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                       "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen_tokenizer():
    """A word-level fast tokenizer in Qwen's conventions, built with ``tokenizers``: ``<|im_start|>`` /
    ``<|im_end|>`` special tokens, ``<|endoftext|>`` as padding (right), newlines and punctuation as tokens, so
    that QwenImagePipeline's prompt template is 34 tokens before the prompt (the count the stock pipeline drops)
    and a Qwen3 chat template for ZImagePipeline."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<unk>": 3, "\n": 4, ",": 5, ":": 6}
    for word in QWEN_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="isolated"),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = QWEN3_CHAT_TEMPLATE
    return fast


def tiny_qwen25_vl(vocab_size: int, hidden: int = 16):
    """Qwen2_5_VLForConditionalGeneration (QwenImagePipeline's text encoder) with a 2-layer text model and a
    1-block vision tower (unused by text prompts, but part of the real class)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2),
        vision_config=dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]),
        vocab_size=vocab_size, hidden_size=hidden, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_vae():
    """AutoencoderKLQwenImage with one spatial downsampling (vae_scale_factor 2), 4 latent channels and its
    per-channel latents_mean / latents_std."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                                  latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 2.0, 1.2]).eval()


def qwenimage_teacher(guidance_embeds: bool = False, shift_terminal: float | None = 0.02):
    """QwenImagePipeline layout: Qwen2.5-VL text encoder (hidden 16 = joint attention), QwenImageTransformer2DModel
    on 2x2 patches of 4 latent channels, AutoencoderKLQwenImage, and Qwen-Image's scheduler settings (exponential
    resolution-dependent shift, shift_terminal)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    tok = tiny_qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5, max_shift=0.9, shift=1.0,
        shift_terminal=shift_terminal, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    return QwenImagePipeline(scheduler=scheduler, vae=tiny_qwen_vae(), text_encoder=tiny_qwen25_vl(len(tok)),
                             tokenizer=tok, transformer=transformer)


def tiny_qwen3(vocab_size: int, hidden: int = 16):
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256, pad_token_id=0,
    )).eval()


def zimage_teacher(shift: float = 3.0, use_dynamic_shifting: bool = False):
    """ZImagePipeline layout: Qwen3 text encoder (hidden 16 = caption features), ZImageTransformer2DModel (patch 2,
    4 latent channels), an AutoencoderKL with scaling and shift factors, and Z-Image-Turbo's static shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tok = tiny_qwen_tokenizer()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=1, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[2, 2, 4], axes_lens=[128, 16, 16],
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=shift, use_dynamic_shifting=use_dynamic_shifting, base_image_seq_len=4, max_image_seq_len=64,
    )
    return ZImagePipeline(scheduler=scheduler, vae=tiny_vae(scaling_factor=0.36, shift_factor=0.11),
                          text_encoder=tiny_qwen3(len(tok)), tokenizer=tok, transformer=transformer)


TEACHERS.update(qwenimage=qwenimage_teacher, zimage=zimage_teacher)
FAMILY_KWARGS.update(qwenimage={"sample_size": 8, "max_sequence_length": QWEN_MAX_LENGTH},
                     zimage={"sample_size": 8, "max_sequence_length": QWEN_MAX_LENGTH})


# ---------------------------------------------------------------------------------------- FLUX.2 (dev and klein)
FLUX2_MAX_LENGTH = 40  # FLUX.2-dev's prompt template puts its system message (~30 words here) before the prompt
FLUX2_KLEIN_MAX_LENGTH = 16
FLUX2_WORDS = tuple(GEMMA_WORDS) + tuple(
    "you are an ai that reasons about image descriptions give structured responses focusing on object "
    "relationships attribution and actions without speculation".split()
) + tuple(".,")


def _word_level_tokenizer(special_tokens: list[str], pad: str, chat_template: str):
    """A word-level fast tokenizer (lower-case words and punctuation, ``<unk>`` for the rest) whose special tokens are
    a chat format's, built with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {token: i for i, token in enumerate(special_tokens)}
    for word in FLUX2_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token=pad,
                                   additional_special_tokens=[t for t in special_tokens if t not in ("<unk>", pad)],
                                   chat_template=chat_template)


# Mistral-Small-3.1's chat format, reduced to what Flux2Pipeline's format_input sends (a system and a user turn of
# text parts); the real template ships with the real processor
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}[/INST]{% endif %}{% endfor %}"
)
# Qwen3's chat format for a user turn and the generation prompt (enable_thinking=False: an empty think block)
QWEN3_THINKING_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% if enable_thinking is defined and enable_thinking is "
    "false %}<think> </think> {% endif %}{% endif %}"
)


def tiny_pixtral_processor():
    """A real ``PixtralProcessor`` (FLUX.2-dev's ``tokenizer``: ``apply_chat_template`` over a Mistral-style word-level
    tokenizer and a ``PixtralImageProcessor``)."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                "[IMG_BREAK]", "[IMG_END]"]
    tokenizer = _word_level_tokenizer(specials, "<pad>", MISTRAL3_CHAT_TEMPLATE)
    tokenizer.bos_token, tokenizer.eos_token = "<s>", "</s>"
    return PixtralProcessor(image_processor=PixtralImageProcessor(patch_size=8), tokenizer=tokenizer, patch_size=8,
                            chat_template=MISTRAL3_CHAT_TEMPLATE)


def tiny_qwen3_tokenizer():
    """A word-level fast tokenizer in Qwen3's chat format (``<|im_start|>`` turns, ``<think>`` block), padding with
    ``<|endoftext|>`` as Qwen's does."""
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    return _word_level_tokenizer(specials, "<|endoftext|>", QWEN3_THINKING_CHAT_TEMPLATE)


def tiny_mistral3(vocab_size: int, hidden: int = 16, layers: int = 30):
    """``Mistral3ForConditionalGeneration`` (Mistral text model + Pixtral vision tower); ``layers`` >= 30 because
    Flux2Pipeline stacks the hidden states 10, 20 and 30."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=256, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    vision = PixtralVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                                 head_dim=8, image_size=16, patch_size=8)
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=8, spatial_merge_size=1,
                            projector_hidden_act="gelu", vision_feature_layer=-1)
    return Mistral3ForConditionalGeneration(config).eval()


def tiny_qwen3_lm(vocab_size: int, hidden: int = 16, layers: int = 28):
    """``Qwen3ForCausalLM``; ``layers`` >= 27 because Flux2KleinPipeline stacks the hidden states 9, 18 and 27."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256, pad_token_id=1,
    )).eval()


def tiny_flux2_vae():
    """``AutoencoderKLFlux2`` with 2 levels (vae_scale_factor 2; 4 with FLUX.2's 2x2 patches), 4 latent channels, and
    batch-norm statistics of its patchified latents away from (0, 1) as a trained one has them."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    ).eval()
    vae.bn.running_mean.copy_(0.1 * torch.randn(16))
    vae.bn.running_var.copy_(0.5 + torch.rand(16))
    return vae


def _flux2_transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=48, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=guidance_embeds,
    ).eval()


def _flux2_scheduler():
    # FLUX.2's: dynamic shifting, whose mu Flux2Pipeline computes from the image size (compute_empirical_mu)
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                           max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


def flux2_teacher():
    """FLUX.2-dev layout: ``Flux2Pipeline`` over a Mistral3 (Pixtral) text encoder and processor, a guidance-distilled
    ``Flux2Transformer2DModel`` (3 stacked hidden states x 16 = joint attention 48) and ``AutoencoderKLFlux2``."""
    from diffusers import Flux2Pipeline

    processor = tiny_pixtral_processor()
    return Flux2Pipeline(scheduler=_flux2_scheduler(), vae=tiny_flux2_vae(),
                         text_encoder=tiny_mistral3(len(processor.tokenizer)), tokenizer=processor,
                         transformer=_flux2_transformer(guidance_embeds=True))


def flux2_klein_teacher(is_distilled: bool = False):
    """FLUX.2-klein layout: ``Flux2KleinPipeline`` over a Qwen3 text encoder, a ``Flux2Transformer2DModel`` without
    guidance embedding (true classifier-free guidance) and ``AutoencoderKLFlux2``."""
    from diffusers import Flux2KleinPipeline

    tokenizer = tiny_qwen3_tokenizer()
    return Flux2KleinPipeline(scheduler=_flux2_scheduler(), vae=tiny_flux2_vae(), text_encoder=tiny_qwen3_lm(len(tokenizer)),
                              tokenizer=tokenizer, transformer=_flux2_transformer(guidance_embeds=False),
                              is_distilled=is_distilled)


TEACHERS.update(flux2=flux2_teacher, flux2_klein=flux2_klein_teacher)
FAMILY_KWARGS.update(flux2={"sample_size": 4, "max_sequence_length": FLUX2_MAX_LENGTH},
                     flux2_klein={"sample_size": 4, "max_sequence_length": FLUX2_KLEIN_MAX_LENGTH})


# ---------------------------------------------------------------------------------------- read from the registry
def call_kwargs(family: str, batch: int = 2) -> dict:
    """What one call of ``family``'s tiny teacher takes, from its adapter's ``conditioning``: prompts (text),
    class labels (class-conditional), a batch size (the tiny ``unet2d`` teacher is unconditional)."""
    from fd_onestep.pipelines.pipeline_fd_onestep import FAMILY_ADAPTERS

    conditioning = FAMILY_ADAPTERS[family].conditioning
    if conditioning == "text":
        return {"prompt": ["a cab", "dog"][:batch] if batch <= 2 else ["cab"] * batch}
    if conditioning == "class":
        return {"class_labels": list(range(batch))}
    return {"batch_size": batch}


def well_conditioned_settings(teacher) -> dict:
    """``timestep=500`` for epsilon teachers (whose top level amplifies float32 rounding 157x), else nothing."""
    return {"timestep": 500} if teacher.scheduler.config.get("prediction_type") == "epsilon" else {}
