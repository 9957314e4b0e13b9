"""Model families are adapters: the pipeline, the library and the training script ask the family's adapter and
never compare a family name; ``example_conditioning`` gives the exact shapes and dtypes of the family's
``encode_prompt`` without running a text encoder (for planning memory on ``meta`` / fake tensors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_pipeline_fd_onestep import onestep_from
from tiny_teachers import TEACHERS

from fd_onestep.pipelines.pipeline_fd_onestep import (
    FAMILY_ADAPTERS,
    SUPPORTED_FAMILIES,
    FamilyAdapter,
    family_of_denoiser,
)

pytestmark = pytest.mark.filterwarnings("ignore:ill-conditioned one-step map")
REPO = Path(__file__).resolve().parent.parent
TEXT_FAMILIES = [name for name, cls in FAMILY_ADAPTERS.items() if cls.conditioning == "text"]


@pytest.fixture(scope="module")
def teachers():
    cache = {}

    def get(family):
        if family not in cache:
            torch.manual_seed(0)
            cache[family] = TEACHERS[family]()
        return cache[family]

    return get


# ------------------------------------------------------------------------------------ one class per family
def test_every_family_is_one_adapter_class_and_every_tiny_teacher_is_detected(teachers):
    assert set(TEACHERS) == set(FAMILY_ADAPTERS)  # a tiny teacher for every family
    for name, cls in FAMILY_ADAPTERS.items():
        assert issubclass(cls, FamilyAdapter) and cls.name == name
        assert SUPPORTED_FAMILIES[name][:2] == (cls.denoiser_slot, cls.denoiser_class)
    for family in TEACHERS:
        teacher = teachers(family)
        denoiser = teacher.components.get("unet") or teacher.components.get("transformer")
        assert family_of_denoiser(denoiser) == family
        pipe = onestep_from(teacher)
        assert pipe.family == family and type(pipe.adapter) is FAMILY_ADAPTERS[family]
        assert pipe.denoiser is getattr(pipe, pipe.denoiser_slot)


def test_every_registered_family_has_its_tiny_teacher_real_config_and_readme_row():
    """The adapter registry is the one list of families: what a new family must bring is checked against it."""
    import json

    from fd_onestep.plan import REAL_CONFIGS_DIR, list_real_configs

    indexes = [json.loads((REAL_CONFIGS_DIR / name / "model_index.json").read_text()) for name in list_real_configs()]
    readme = (REPO / "README.md").read_text()
    for family, cls in FAMILY_ADAPTERS.items():
        assert family in TEACHERS, f"{family}: add its tiny teacher to TEACHERS in tests/tiny_teachers.py"
        has_config = any(cls.owns_model_index(index) for index in indexes)
        assert has_config, f"{family}: bundle its published config in fd_onestep/real_configs/ (named in index.json)"
        assert f"| `{family}` |" in readme, f"{family}: add its row to the README's supported-families table"


def test_published_dit_model_index_naming_the_legacy_transformer2dmodel_is_the_dit_family():
    # facebook/DiT-XL-2-256 (and the bundled dit-xl-2-256) name Transformer2DModel, which diffusers loads as a
    # DiTTransformer2DModel; the same class under another pipeline (PixArt's old repositories) is not DiT
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}
    assert [f for f, cls in FAMILY_ADAPTERS.items() if cls.owns_model_index(index)] == ["dit"]
    assert not any(cls.owns_model_index({**index, "_class_name": "PixArtAlphaPipeline"})
                   for cls in FAMILY_ADAPTERS.values())


def test_a_saved_dit_teacher_naming_transformer2dmodel_loads_as_the_dit_family(tmp_path):
    import json

    from tiny_teachers import dit_teacher

    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

    dit_teacher().save_pretrained(tmp_path)
    for file, key in (("model_index.json", "transformer"), ("transformer/config.json", "_class_name")):
        config = json.loads((tmp_path / file).read_text())
        config[key] = ["diffusers", "Transformer2DModel"] if key == "transformer" else "Transformer2DModel"
        (tmp_path / file).write_text(json.dumps(config))
    pipe = FDOneStepPipeline.from_teacher(str(tmp_path))
    assert pipe.family == "dit" and type(pipe.transformer).__name__ == "DiTTransformer2DModel"


_FAMILY_NAME = r"""["'](?:""" + "|".join(map(re.escape, FAMILY_ADAPTERS)) + r""")["']"""
_COMPARISONS = [
    re.compile(r"(?:==|!=|\bin\b)\s*\(?\s*" + _FAMILY_NAME),  # family == "sd", family in ("sd3", "flux")
    re.compile(_FAMILY_NAME + r"\s*(?:==|!=)"),  # "sd" == family
    re.compile(r"\{\s*" + _FAMILY_NAME + r"\s*:"),  # {"sd": ..., "sd3": ...}[family] / .get(family)
]


def family_name_comparisons(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if not line.strip().startswith("#")
            and any(p.search(line) for p in _COMPARISONS)]


def test_outside_the_adapters_nothing_compares_a_family_name():
    files = [REPO / "pipelines" / "pipeline_fd_onestep.py", REPO / "train_scripts" / "train_fd_onestep.py",
             *sorted((REPO / "fd_onestep").rglob("*.py"))]
    found = {str(f.relative_to(REPO)): family_name_comparisons(f.read_text()) for f in files}
    found = {k: v for k, v in found.items() if v}
    assert sum(map(len, found.values())) <= 4, found
    # the pattern sees the comparisons the pipeline was made of before the adapters
    assert family_name_comparisons('if fam in ("unet2d", "dit"):\n    x = {"sd": 1}.get(self.family)\n') == [
        'if fam in ("unet2d", "dit"):', 'x = {"sd": 1}.get(self.family)']


# ------------------------------------------------------------------------------------ example_conditioning
def _encode(pipe, n, guidance_scale):
    if pipe.is_text_conditional:
        prompts = ["a cab", "dog two", "zz"][:n] + ["cab"] * max(0, n - 3)
        return pipe.encode_conditioning(prompt=prompts, guidance_scale=guidance_scale, device="cpu")
    if pipe.is_class_conditional:
        return pipe.encode_conditioning(class_labels=list(range(n)), guidance_scale=guidance_scale, device="cpu")
    return pipe.encode_conditioning(guidance_scale=guidance_scale, device="cpu")


def assert_same_layout(example, encoded):
    if encoded is None:
        assert example is None
        return
    got = {k: (tuple(v.shape), v.dtype) for k, v in example._tensors().items()}
    want = {k: (tuple(v.shape), v.dtype) for k, v in encoded._tensors().items()}
    assert got == want


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("family", list(FAMILY_ADAPTERS))
def test_example_conditioning_has_the_shapes_and_dtypes_of_encode_prompt(teachers, family, guidance_scale):
    pipe = onestep_from(teachers(family), guidance_scale=guidance_scale)
    assert_same_layout(pipe.example_conditioning(3), _encode(pipe, 3, guidance_scale))


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_example_conditioning_follows_half_precision_text_encoders(family):
    torch.manual_seed(0)
    teacher = TEACHERS[family]()
    for name in ("text_encoder", "text_encoder_2"):  # SD3: the T5 stays float32 and promotes the joint sequence
        if getattr(teacher, name, None) is not None:
            getattr(teacher, name).to(torch.bfloat16)
    pipe = onestep_from(teacher, guidance_scale=2.0)
    encoded = _encode(pipe, 2, 2.0)
    assert_same_layout(pipe.example_conditioning(2), encoded)
    assert encoded.prompt_embeds.dtype in (torch.bfloat16, torch.float32)


def test_example_conditioning_dtype_override_keeps_integer_tensors(teachers):
    pipe = onestep_from(teachers("sana"), guidance_scale=2.0)
    cond = pipe.example_conditioning(2, dtype=torch.float16)
    assert cond.prompt_embeds.dtype == torch.float16 and cond.prompt_attention_mask.dtype == torch.long
    labels = onestep_from(teachers("dit")).example_conditioning(2, dtype=torch.float16).class_labels
    assert labels.dtype == torch.long and labels.shape == (2,)


@pytest.mark.parametrize("family", list(FAMILY_ADAPTERS))
def test_example_conditioning_of_components_on_the_meta_device_and_under_fake_tensors(family):
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    teacher = TEACHERS[family]()
    reference = onestep_from(teacher, guidance_scale=2.0)
    expected = reference.example_conditioning(2)
    for module in teacher.components.values():
        if isinstance(module, torch.nn.Module):
            module.to("meta")  # a real-size model planned without memory
    pipe = onestep_from(teacher, guidance_scale=2.0)
    on_meta = pipe.example_conditioning(2)
    assert_same_layout(on_meta, expected)
    assert on_meta is None or all(t.device.type == "meta" for t in on_meta._tensors().values())
    with FakeTensorMode():
        fake = reference.example_conditioning(2, device="cpu")
    assert_same_layout(fake, expected)


def test_example_conditioning_needs_no_text_encoder_forward(teachers, monkeypatch):
    pipe = onestep_from(teachers("sdxl"), guidance_scale=2.0)

    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder ran")

    for name in ("text_encoder", "text_encoder_2"):
        monkeypatch.setattr(getattr(pipe, name), "forward", refuse)
    assert pipe.example_conditioning(4).prompt_embeds.shape[0] == 4
