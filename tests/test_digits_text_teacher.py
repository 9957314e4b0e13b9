"""The bundled text-conditional digits teacher: a stock StableDiffusionPipeline whose prompts name the digit."""

import pytest
import torch

from fd_onestep.demos import digits
from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

pytestmark = pytest.mark.filterwarnings("ignore:ill-conditioned one-step map")


@pytest.fixture(scope="module")
def teacher():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(digits.TEXT_TEACHER_PATH, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_it_loads_offline_as_a_stock_stable_diffusion_pipeline_of_small_stock_components(teacher):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(teacher.unet, UNet2DConditionModel) and isinstance(teacher.vae, AutoencoderKL)
    assert isinstance(teacher.text_encoder, CLIPTextModel) and isinstance(teacher.tokenizer, CLIPTokenizer)
    assert teacher.vae.config.in_channels == teacher.vae.config.out_channels == 1
    assert teacher.unet.config.sample_size * teacher.vae_scale_factor == digits.DIGITS_RESOLUTION
    config = teacher.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    size = sum(p.stat().st_size for p in digits.TEXT_TEACHER_PATH.rglob("*") if p.is_file())
    assert size < 6 * 2**20, f"the text teacher is {size / 2**20:.1f} MB"


def test_every_prompt_is_whole_word_tokens_and_the_held_out_phrasings_use_only_trained_words(teacher):
    tok = teacher.tokenizer
    for c in range(digits.NUM_CLASSES):
        for phrasing in digits.TRAINING_PHRASINGS + digits.HELD_OUT_PHRASINGS:
            prompt = digits.digit_prompt(c, phrasing)
            tokens = tok.convert_ids_to_tokens(tok(prompt).input_ids)[1:-1]
            assert tokens == [w + "</w>" for w in prompt.split()], prompt  # one token per word, no fallback
            assert len(tokens) + 2 <= tok.model_max_length
    trained = {w for c in range(10) for ph in digits.TRAINING_PHRASINGS for w in digits.digit_prompt(c, ph).split()}
    held_out = {w for c in range(10) for ph in digits.HELD_OUT_PHRASINGS for w in digits.digit_prompt(c, ph).split()}
    assert held_out <= trained
    assert not set(digits.HELD_OUT_PHRASINGS) & set(digits.TRAINING_PHRASINGS)


def test_digit_prompts_name_each_label_in_one_of_the_phrasings():
    g = torch.Generator().manual_seed(0)
    prompts = digits.digit_prompts(torch.tensor([7, 0, 3, 3]), digits.HELD_OUT_PHRASINGS, g)
    assert len(prompts) == 4
    for prompt, c in zip(prompts, [7, 0, 3, 3]):
        assert prompt in {digits.digit_prompt(c, ph) for ph in digits.HELD_OUT_PHRASINGS}
    assert digits.digit_prompt(7, "the number {numeral}") == "the number 7"
    with pytest.raises(ValueError, match="0-9"):
        digits.digit_prompt(10, "{word}")


def test_its_one_step_pipeline_and_the_stock_one_step_agree(teacher):
    pipe = FDOneStepPipeline.from_teacher(digits.TEXT_TEACHER_PATH, local_files_only=True, timestep=600,
                                          output_bound="clamp")
    assert pipe.family == "sd" and pipe.config.prediction_type == "v_prediction"
    prompts = ["the digit seven", "a handwritten digit two"]
    ours = pipe(prompts, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert ours.shape == (2, 1, 16, 16)
    recipe = pipe.stock_one_step()
    teacher.scheduler = recipe["scheduler"]
    stock = teacher(prompts, generator=torch.Generator().manual_seed(1), output_type="pt", **recipe["call_kwargs"]).images
    torch.testing.assert_close(stock, ours, rtol=0, atol=2e-5)


def test_the_comparison_asks_the_text_teacher_for_each_requested_digit_in_a_phrasing(monkeypatch):
    from fd_onestep.demos.digits.baselines import digits_text_generators
    from fd_onestep.comparison.generators import prompted_pipeline

    generators = digits_text_generators(digits.HELD_OUT_PHRASINGS, num_inference_steps=2)
    assert list(generators) == ["teacher, 1 step (naive)", "teacher, dpmsolver++ 2 steps"]
    for generate in generators.values():
        images = generate(4, torch.Generator().manual_seed(0), torch.tensor([1, 2, 3, 4]))
        assert images.shape == (4, 1, 16, 16) and images.min() >= -1 and images.max() <= 1

    # several phrasing sets share one load of the teacher: the generators of the second call use the first's
    # pipelines and prompt them in its own phrasings
    from fd_onestep.demos.digits.baselines import load_digits_text_teachers

    teachers = load_digits_text_teachers()

    def no_second_load(*args, **kwargs):
        raise AssertionError("the teacher was loaded again")

    import diffusers

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", no_second_load)
    monkeypatch.setattr(FDOneStepPipeline, "from_teacher", no_second_load)
    shared = digits_text_generators(digits.HELD_OUT_PHRASINGS, num_inference_steps=2, teachers=teachers)
    labels = torch.tensor([5, 6, 7, 8])
    for name, generate in shared.items():
        torch.testing.assert_close(generate(4, torch.Generator().manual_seed(0), labels),
                                   generators[name](4, torch.Generator().manual_seed(0), labels), rtol=0, atol=0)

    seen = []

    class Recorder:  # a pipeline that records the prompts it is given
        def __call__(self, prompts, generator=None, output_type=None):
            seen.extend(prompts)
            return type("Out", (), {"images": torch.zeros(len(prompts), 1, 4, 4)})()

    generate = prompted_pipeline(Recorder(), lambda labels, g: [f"digit {int(c)}" for c in labels], description="x")
    assert generate(2, torch.Generator(), torch.tensor([7, 0])).min() == -1  # [0, 1] -> [-1, 1]
    assert seen == ["digit 7", "digit 0"]
    with pytest.raises(ValueError, match="needs class_labels"):
        generate(2, torch.Generator())
