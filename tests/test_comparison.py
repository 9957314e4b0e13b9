"""compare_generators: grid, FD table in every representation (held-out marked, FD_r), class coverage."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fd_onestep.demos import digits
from fd_onestep.comparison.generators import naive_one_step_teacher, teacher_sampler
from fd_onestep.comparison.measure import compare_generators

NAMES = digits.TRAINING_ENCODERS + digits.HELD_OUT_ENCODERS


@pytest.fixture(scope="module")
def bundled():
    from fd_onestep.encoders import load_encoder
    from fd_onestep.reference_stats import ReferenceStats

    encoders = {n: load_encoder(digits.encoder_spec(n), local_files_only=True) for n in NAMES}
    references = {n: ReferenceStats.load(digits.stats_path(n)) for n in NAMES}
    return encoders, references, digits.load_digit_classifier()


@pytest.fixture(scope="module")
def teacher():
    from diffusers import DDPMPipeline

    return DDPMPipeline.from_pretrained(digits.TEACHER_PATH, local_files_only=True)


def real_digits(batch_size, generator):
    """Draws validation-split digits: a generator as good as the data."""
    images, _ = digits.load_digits_split("validation")
    return images[torch.randint(0, len(images), (batch_size,), generator=generator)]


def noise(batch_size, generator):
    return torch.rand(batch_size, 1, 16, 16, generator=generator) * 2 - 1


def test_writes_grid_table_and_json_with_every_representation(tmp_path, bundled):
    encoders, references, classifier = bundled
    report = compare_generators(
        {"real digits": real_digits, "noise": noise},
        encoders,
        references,
        num_samples=300,
        output_dir=tmp_path,
        held_out=set(digits.HELD_OUT_ENCODERS),
        classifier=classifier,
        grid_samples=16,
    )
    assert json.loads((tmp_path / "comparison.json").read_text()) == json.loads(json.dumps(report))
    grid = Image.open(tmp_path / "comparison_grid.png")
    assert grid.width > 1.5 * grid.height  # two square blocks side by side, not stacked

    assert set(report["representations"]) == set(NAMES)
    for name in NAMES:
        info = report["representations"][name]
        assert info["held_out"] == (name in digits.HELD_OUT_ENCODERS)
        assert info["validation_fd"] == pytest.approx(references[name].validation_fd)
        real, bad = report["generators"]["real digits"], report["generators"]["noise"]
        assert real["fd"][name] < bad["fd"][name] / 5
        assert real["fd_r"][name] == pytest.approx(real["fd"][name] / info["validation_fd"])

    table = (tmp_path / "comparison.md").read_text()
    for name in digits.HELD_OUT_ENCODERS:
        assert f"FD {name} (held out)" in table
    for name in digits.TRAINING_ENCODERS:
        assert f"FD {name} |" in table and f"FD_r {name}" in table
    assert "| validation split (reference) |" in table and "| real digits |" in table and "| noise |" in table
    assert "Conditioning" not in table and "num_classes" not in report and "adherence" not in report["generators"]["noise"]

    hist = report["generators"]["real digits"]["class_histogram"]
    assert hist["num_samples"] == 300 and hist["classes_present"] == 10


def test_same_seed_gives_the_same_report(bundled):
    encoders, references, _ = bundled
    kwargs = dict(num_samples=64, grid_samples=0, seed=3)
    first = compare_generators({"real": real_digits}, encoders, references, **kwargs)
    second = compare_generators({"real": real_digits}, encoders, references, **kwargs)
    assert first["generators"]["real"]["fd"] == second["generators"]["real"]["fd"]


def test_generators_sample_in_inference_mode(bundled):
    """Every sampler call (grid and FD samples) runs without autograd bookkeeping: the images are only read."""
    encoders, references, _ = bundled
    modes = []

    def recording(batch_size, generator):
        modes.append(torch.is_inference_mode_enabled())
        return real_digits(batch_size, generator)

    compare_generators({"real": recording}, encoders, references, num_samples=64, grid_samples=8, batch_size=32)
    assert modes == [True, True, True]  # one grid batch, two FD batches


def test_rejects_mismatched_inputs(bundled):
    encoders, references, _ = bundled
    with pytest.raises(ValueError, match="same names"):
        compare_generators({"real": real_digits}, encoders, {}, num_samples=8)
    with pytest.raises(ValueError, match="held_out"):
        compare_generators({"real": real_digits}, encoders, references, num_samples=8, held_out={"inception"})
    swapped = dict(references)
    swapped["dinov2-digits"] = references["siglip-digits"]
    with pytest.raises(ValueError):
        compare_generators({"real": real_digits}, encoders, swapped, num_samples=8, grid_samples=0)
    with pytest.raises(ValueError, match="returned"):
        compare_generators({"flat": lambda b, g: torch.zeros(b, 16, 16)}, encoders, references, num_samples=8)
    with pytest.raises(ValueError, match="NaN"):
        compare_generators({"nan": lambda b, g: torch.full((b, 1, 16, 16), float("nan"))}, encoders, references, num_samples=8)


def test_naive_one_step_teacher_is_minus_v_at_the_top_timestep(teacher):
    generate = naive_one_step_teacher(teacher)
    images = generate(4, torch.Generator().manual_seed(0))
    x_t = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = teacher.unet(x_t, torch.full((4,), 999)).sample
    torch.testing.assert_close(images, -v)


def tiny_ddpm(prediction_type, zero_snr, num_class_embeds=None):
    """An untrained 1-channel 8x8 DDPMPipeline (class-conditional with ``num_class_embeds``)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=num_class_embeds)
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(rescale_betas_zero_snr=zero_snr, prediction_type=prediction_type))


def test_naive_one_step_rejects_epsilon_prediction_at_zero_snr():
    pipe = tiny_ddpm("epsilon", zero_snr=True)
    with pytest.raises(ValueError, match="smaller timestep"):
        naive_one_step_teacher(pipe)
    assert naive_one_step_teacher(pipe, timestep=600)(2, torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("timestep", [600, 10])
def test_naive_one_step_is_the_closed_form_x0_estimate_bit_for_bit(prediction_type, timestep):
    pipe = tiny_ddpm(prediction_type, zero_snr=False)
    images = naive_one_step_teacher(pipe, timestep)(3, torch.Generator().manual_seed(1))
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = pipe.unet(x_t, torch.full((3,), timestep)).sample
    alpha_bar = pipe.scheduler.alphas_cumprod[timestep].double()
    a, s = alpha_bar.sqrt().item(), (1 - alpha_bar).sqrt().item()  # float64 square roots
    expected = {"epsilon": (x_t - s * out) / a, "v_prediction": a * x_t - s * out, "sample": out}[prediction_type]
    assert images.dtype == torch.float32 and torch.equal(images, expected)


@pytest.mark.parametrize("timestep", [1000, -1])
def test_naive_one_step_rejects_a_timestep_outside_the_schedule(timestep):
    with pytest.raises(ValueError, match=r"timestep must be an int in \[0, 999\]"):
        naive_one_step_teacher(tiny_ddpm("v_prediction", zero_snr=True), timestep)


def test_teacher_multi_step_beats_naive_one_step_on_held_out_representations(bundled, teacher):
    encoders, references, _ = bundled
    held_out = {n: encoders[n] for n in digits.HELD_OUT_ENCODERS}
    report = compare_generators(
        {"naive": naive_one_step_teacher(teacher), "teacher": teacher_sampler(teacher, 10)},
        held_out,
        {n: references[n] for n in held_out},
        num_samples=256,
        grid_samples=0,
    )
    for name in held_out:
        assert report["generators"]["teacher"]["fd"][name] * 5 < report["generators"]["naive"]["fd"][name]


def test_one_step_pipeline_generates_the_pipelines_clamped_one_step_images(teacher):
    from fd_onestep.comparison.generators import one_step_pipeline
    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

    pipe = FDOneStepPipeline.from_teacher(digits.TEACHER_PATH, timestep=600, output_bound="clamp", local_files_only=True)
    images = one_step_pipeline(pipe)(5, torch.Generator().manual_seed(1))
    assert images.shape == (5, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    noise = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = pipe.one_step(noise)
    # the pipeline's postprocess goes through [0, 1]; one float32 rounding step each way
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)


def test_seed_spread_is_the_mean_and_std_of_per_seed_comparisons(tmp_path, bundled):
    from fd_onestep.comparison.measure import seed_spread

    encoders, references, _ = bundled
    generators = {"real": real_digits, "noise": noise}
    spread = seed_spread(generators, encoders, references, seeds=[0, 2, 4], num_samples=64, output_dir=tmp_path,
                         held_out=set(digits.HELD_OUT_ENCODERS))
    for seed_index, seed in enumerate([0, 2, 4]):
        single = compare_generators(generators, encoders, references, num_samples=64, grid_samples=0, seed=seed)
        for gname in generators:
            for rep in NAMES:
                assert spread["generators"][gname][rep]["values"][seed_index] == single["generators"][gname]["fd"][rep]
    values = torch.tensor(spread["generators"]["real"]["randcnn-digits"]["values"], dtype=torch.float64)
    assert spread["generators"]["real"]["randcnn-digits"]["std"] == pytest.approx(float(values.std()))
    assert float(values.std()) > 0  # different seeds draw different samples
    table = (tmp_path / "seed_spread.md").read_text()
    assert "FD randcnn-digits (held out)" in table and "±" in table and "| noise |" in table
    assert json.loads((tmp_path / "seed_spread.json").read_text()) == json.loads(json.dumps(spread))
    with pytest.raises(ValueError, match="two distinct seeds"):
        seed_spread(generators, encoders, references, seeds=[3], num_samples=8)


def test_seed_spread_reuses_a_matching_known_report_instead_of_measuring_again(bundled):
    import copy

    from fd_onestep.comparison.measure import seed_spread

    encoders, references, _ = bundled
    generators = {"real": real_digits}
    known = copy.deepcopy(compare_generators(generators, encoders, references, num_samples=64, grid_samples=0, seed=0))
    known["generators"]["real"]["fd"]["randcnn-digits"] = 123.0  # a marker: only reuse can produce it
    other_n = copy.deepcopy(known)
    other_n["num_samples"], other_n["seed"] = 32, 2  # different N: must not stand in for seed 2
    spread = seed_spread(generators, encoders, references, seeds=[0, 2], num_samples=64,
                         known_reports=[known, other_n])
    values = spread["generators"]["real"]["randcnn-digits"]["values"]
    assert values[0] == 123.0 and values[1] != 123.0


def test_cli_rejects_malformed_student_and_a_single_spread_seed(tmp_path, capsys):
    from fd_onestep.demos.digits.__main__ import main

    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path), "--students", "no-equals-sign"])
    assert "NAME=FOLDER" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path), "--spread_seeds", "1"])
    assert "two or more seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path), "--spread_seeds", "1", "1"])
    assert "all distinct" in capsys.readouterr().err


def test_cli_runs_as_a_module_with_its_arguments():
    result = subprocess.run([sys.executable, "-m", "fd_onestep.demos.digits", "--help"], capture_output=True, text=True,
                            check=True)
    for flag in ("--output_dir", "--num_samples", "--sampler", "--num_inference_steps", "--extra", "--students",
                 "--seed", "--spread_seeds"):
        assert flag in result.stdout


def test_package_reexports_the_public_names_from_their_modules():
    from fd_onestep import comparison
    from fd_onestep.comparison import generators, measure, report

    homes = {
        generators: ["GeneratorFn", "teacher_sampler", "naive_one_step_teacher", "one_step_pipeline"],
        measure: ["compare_generators", "seed_spread"],
        report: ["format_markdown_table", "format_seed_spread_table", "save_comparison_grid"],
    }
    assert sorted(comparison.__all__) == sorted(name for names in homes.values() for name in names)
    for module, names in homes.items():
        for name in names:
            assert getattr(comparison, name) is getattr(module, name)
    assert report.TABLE_FILENAME == "comparison.md" and report.GRID_FILENAME == "comparison_grid.png"


@pytest.mark.parametrize("channels", [1, 3])
def test_comparison_grid_pixels_are_the_clamped_images_upscaled_with_white_padding(tmp_path, channels):
    from torchvision.utils import make_grid

    from fd_onestep.comparison.report import save_comparison_grid

    g = torch.Generator().manual_seed(0)
    blocks = {name: torch.rand(5, channels, 4, 4, generator=g) * 2.4 - 1.2 for name in ("a", "b")}
    path = save_comparison_grid(blocks, tmp_path / "grid.png", cell=6)
    canvas = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
    x0, label_h, gap = 0, 28, 16
    for images in blocks.values():
        x01 = (images.clamp(-1, 1) + 1) / 2
        upscaled = torch.nn.functional.interpolate(x01.expand(-1, 3, -1, -1), size=(6, 6), mode="nearest")
        expected = (make_grid(upscaled, nrow=math.ceil(math.sqrt(5)), padding=2, pad_value=1.0) * 255).round().to(torch.uint8)
        h, w = expected.shape[1:]
        assert torch.equal(canvas[:, label_h:label_h + h, x0:x0 + w], expected)
        x0 += w + gap
    assert canvas.shape[2] == x0 - gap
