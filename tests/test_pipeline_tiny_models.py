"""The tiny, offline diffusers teachers of every supported family (built in tiny_teachers.py from configs, no
downloads) are the real diffusers pipelines with real tokenizers, and stay tiny enough for CI on 2 cores.

The other pipeline / one-step / LoRA test files import the builders from here (re-exported from tiny_teachers).
"""

from __future__ import annotations

import pytest
import torch
from tiny_teachers import (  # noqa: F401  (re-exported: the other test files import the builders from here)
    CLIP_MAX_LENGTH,
    FAMILY_KWARGS,
    SANA_MAX_LENGTH,
    T5_MAX_LENGTH,
    TEACHERS,
    ddpm_teacher,
    dit_teacher,
    flux_teacher,
    sana_teacher,
    sd3_teacher,
    sd_teacher,
    sdxl_teacher,
    tiny_clip_tokenizer,
    tiny_gemma_tokenizer,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
    tiny_unet2d,
    tiny_vae,
)


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
