"""compare_generators for class-conditional generators: the teacher's labelled sampling loop, adherence,
per-class FD and FJD, per-class PNG folders, the Conditioning table; tiny models only (seconds)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_comparison import tiny_ddpm

from fd_onestep.comparison.generators import (
    naive_one_step_teacher,
    one_step_pipeline,
    scheduler_loop,
    teacher_sampler,
)
from fd_onestep.comparison.measure import compare_generators, seed_spread
from fd_onestep.comparison.report import SAMPLES_DIRNAME, format_markdown_table

C = 3  # classes of the tiny teacher
SAMPLERS = ["dpmsolver++", "ddim", "ddpm"]


def scheduler_class(name):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    return {"dpmsolver++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}[name]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convolutions are latency-bound: on a busy 2-core machine a second OpenMP thread makes each 8x8 UNet
    forward ~100x slower (waiting for the other core); the results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def class_teacher():
    torch.manual_seed(0)
    return tiny_ddpm("v_prediction", zero_snr=True, num_class_embeds=C)


# ------------------------------------------------------------------------------------------ the teacher's loop
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_loop_is_ddpm_pipelines_loop_bit_for_bit_on_an_unconditional_unet(sampler):
    from diffusers import DDPMPipeline

    pipe = tiny_ddpm("v_prediction", zero_snr=True)
    stock = DDPMPipeline(unet=pipe.unet, scheduler=scheduler_class(sampler).from_config(pipe.scheduler.config))
    stock.set_progress_bar_config(disable=True)
    expected = stock(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=4,
                     output_type="pt").images
    solver = scheduler_class(sampler).from_config(pipe.scheduler.config)
    images = scheduler_loop(pipe.unet, solver, 3, torch.Generator().manual_seed(5), 4)
    assert torch.equal(images, expected)
    # the unconditional teacher_sampler is that pipeline, [0, 1] -> [-1, 1]
    sampled = teacher_sampler(pipe, 4, sampler)(3, torch.Generator().manual_seed(5))
    assert torch.equal(sampled, expected * 2 - 1)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_class_labels_steer_the_class_conditional_teacher(class_teacher, sampler):
    sample = teacher_sampler(class_teacher, 3, sampler)
    zeros = sample(4, torch.Generator().manual_seed(1), torch.zeros(4, dtype=torch.int64))
    again = sample(4, torch.Generator().manual_seed(1), [0, 0, 0, 0])  # a list of ints works too
    twos = sample(4, torch.Generator().manual_seed(1), torch.full((4,), 2))
    assert zeros.shape == (4, 1, 8, 8) and zeros.min() >= -1 and zeros.max() <= 1
    assert torch.equal(zeros, again)
    assert (zeros - twos).abs().amax() > 1e-3
    assert sample.description == f"{sampler} 3 steps"


def test_guidance_is_uncond_plus_scale_times_cond_minus_uncond(class_teacher):
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    scale, null = 3.0, C - 1
    labels = torch.tensor([0, 1, 0])
    sample = teacher_sampler(class_teacher, 1, "ddim", guidance_scale=scale, null_class_label=null)
    images = sample(3, torch.Generator().manual_seed(2), labels)
    # one DDIM step by hand: the two branches run separately here
    unet = class_teacher.unet
    solver = DDIMScheduler.from_config(class_teacher.scheduler.config)
    solver.set_timesteps(1)
    t = solver.timesteps[0]
    x = randn_tensor((3, 1, 8, 8), generator=torch.Generator().manual_seed(2), dtype=unet.dtype)
    with torch.no_grad():
        cond = unet(x, t, class_labels=labels).sample
        uncond = unet(x, t, class_labels=torch.full((3,), null)).sample
    expected = solver.step(uncond + scale * (cond - uncond), t, x).prev_sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    unguided = teacher_sampler(class_teacher, 1, "ddim")(3, torch.Generator().manual_seed(2), labels)
    assert (images - unguided).abs().amax() > 1e-3
    assert sample.description == "ddim 1 steps, guidance 3"


def test_wrong_or_missing_class_labels_are_clear_value_errors(class_teacher):
    sample = teacher_sampler(class_teacher, 2, "ddim")
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="class-conditional.*pass class_labels"):
        sample(4, g)
    with pytest.raises(ValueError, match="3 entries for 4 samples"):
        sample(4, g, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        sample(2, g, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer tensor"):
        sample(2, g, torch.tensor([0.0, 1.0]))
    naive = naive_one_step_teacher(class_teacher)
    with pytest.raises(ValueError, match="class-conditional"):
        naive(2, g)
    with pytest.raises(ValueError, match="1 entries for 2 samples"):
        naive(2, g, torch.tensor([1]))
    unconditional = tiny_ddpm("v_prediction", zero_snr=True)
    with pytest.raises(ValueError, match="unconditional: drop class_labels"):
        teacher_sampler(unconditional, 2)(2, g, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="null_class_label"):
        teacher_sampler(class_teacher, 2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="null_class_label"):
        teacher_sampler(class_teacher, 2, guidance_scale=2.0, null_class_label=C)
    with pytest.raises(ValueError, match="class-conditional UNet"):
        teacher_sampler(unconditional, 2, guidance_scale=2.0, null_class_label=0)
    # a conditional teacher in an unconditional comparison is called without labels: the same clear error
    encoders, references, _ = pixel_setup()
    with pytest.raises(ValueError, match="pass class_labels"):
        compare_generators({"teacher": sample}, encoders, references, num_samples=6, grid_samples=0)


def test_naive_one_step_passes_the_class_labels_to_the_unet(class_teacher):
    labels = torch.tensor([2, 0, 1])
    images = naive_one_step_teacher(class_teacher)(3, torch.Generator().manual_seed(0), labels)
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = class_teacher.unet(x_t, torch.full((3,), 999), class_labels=labels).sample
    torch.testing.assert_close(images, -v)  # zero terminal SNR, v-prediction: x0 = -v


def test_one_step_pipeline_takes_class_labels_of_a_class_conditional_pipeline(class_teacher, tmp_path):
    from fd_onestep.pipelines.pipeline_fd_onestep import FDOneStepPipeline

    class_teacher.save_pretrained(tmp_path / "teacher")
    pipe = FDOneStepPipeline.from_teacher(str(tmp_path / "teacher"), timestep=600, output_bound="clamp")
    pipe.set_progress_bar_config(disable=True)
    generate = one_step_pipeline(pipe)
    labels = torch.tensor([0, 2, 1, 2])
    images = generate(4, torch.Generator().manual_seed(3), labels)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = pipe.one_step(noise, pipe.encode_conditioning(class_labels=labels))
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)  # through [0, 1] and back
    other = generate(4, torch.Generator().manual_seed(3), torch.tensor([1, 1, 0, 0]))
    assert (images - other).abs().amax() > 1e-4
    with pytest.raises(ValueError, match="class-conditional"):
        generate(4, torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="2 entries for 4 samples"):
        generate(4, torch.Generator().manual_seed(3), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------ compare_generators
def pixel_setup(seed=0):
    """The 4x4 gray-pixel encoder (16 features), reference statistics of random labelled features."""
    from fd_onestep.conditioning_metrics import ClassConditionalMoments, ClassConditionalStats
    from fd_onestep.encoders import load_encoder
    from fd_onestep.reference_stats import ReferenceStats

    encoder = load_encoder("pixels-gray:4")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(90) % C
    features = torch.randn(90, 16, generator=g, dtype=torch.float64) * 0.5 + (labels[:, None] - 1.0)
    moments = ClassConditionalMoments(16, C).update(features, labels)
    return ({"px": encoder}, {"px": ReferenceStats.from_features(features, encoder_id=encoder.encoder_id)},
            {"px": ClassConditionalStats.from_moments(moments, encoder_id=encoder.encoder_id)})


def paint(classes, generator):
    """8x8 gray images of brightness -1 + class (0, 1, 2 -> -1, 0, 1) plus a little noise."""
    noise = torch.randn(len(classes), 1, 8, 8, generator=generator) * 0.1
    return (classes.float()[:, None, None, None] - 1 + noise).clamp(-1, 1)


def follower(batch_size, generator, class_labels):
    return paint(class_labels, generator)


def ignorer(batch_size, generator, class_labels):
    return paint(torch.randint(0, C, (batch_size,), generator=generator), generator)


def read_brightness(images):
    """A 'classifier' that reads the painted class back from the mean brightness."""
    return (images.mean(dim=(1, 2, 3)) + 1).round().clamp(0, C - 1).long()


def test_conditional_comparison_reports_adherence_per_class_fd_fjd_and_writes_class_folders(tmp_path, class_teacher):
    from fd_onestep.evaluation import evaluate_images

    encoders, references, class_refs = pixel_setup()
    teacher = teacher_sampler(class_teacher, 2, "ddim")
    generators = {"teacher, ddim 2 steps": teacher, "follows its label": follower, "ignores its label": ignorer}
    folders = {"teacher, ddim 2 steps": "teacher", "follows its label": "follower"}
    n, gpc = 30, 4
    report = compare_generators(generators, encoders, references, num_samples=n, output_dir=tmp_path,
                                held_out={"px"}, classifier=read_brightness, classifier_name="brightness",
                                num_classes=C, class_references=class_refs, sample_folders=folders,
                                grid_per_class=gpc, batch_size=7, seed=2)

    assert report["num_classes"] == C and report["conditioning_representations"] == ["px"]
    assert report["classifier"] == "brightness"
    assert report["sample_folders"] == {g: f"{SAMPLES_DIRNAME}/{f}" for g, f in folders.items()}
    assert json.loads((tmp_path / "comparison.json").read_text()) == json.loads(json.dumps(report))
    for result in report["generators"].values():
        assert set(result) >= {"fd", "fd_r", "adherence", "conditioning", "class_histogram", "clamped_fraction"}
        measures = result["conditioning"]["px"]
        assert set(measures) == {"per_class_fd", "fjd", "class_fd"} and set(measures["class_fd"]) == {"0", "1", "2"}
        assert measures["per_class_fd"] == pytest.approx(sum(measures["class_fd"].values()) / C)
        assert result["class_histogram"] is None  # a predictions callable: adherence only
    follows, ignores = report["generators"]["follows its label"], report["generators"]["ignores its label"]
    assert follows["adherence"] == 1.0 and ignores["adherence"] < 0.6
    # the label-ignoring generator has the right mixture (a similar FD) but the wrong classes
    assert ignores["conditioning"]["px"]["per_class_fd"] > 5 * follows["conditioning"]["px"]["per_class_fd"]
    assert ignores["conditioning"]["px"]["fjd"] > 2 * follows["conditioning"]["px"]["fjd"]

    # the teacher's numbers are evaluate_images' of its samples, with the balanced labels arange(n) % C
    labels = torch.arange(n) % C
    g = torch.Generator().manual_seed(3)  # the FD samples use seed + 1
    samples = torch.cat([teacher(len(labels[i:i + 7]), g, labels[i:i + 7]) for i in range(0, n, 7)]).clamp(-1, 1)
    direct = evaluate_images(samples, encoders, references, labels=labels, class_references=class_refs,
                             classifier=read_brightness)
    mine = report["generators"]["teacher, ddim 2 steps"]
    assert mine["fd"]["px"] == pytest.approx(direct.representations["px"].fd, rel=1e-9)
    assert mine["adherence"] == direct.conditioning.adherence
    assert mine["conditioning"]["px"]["fjd"] == pytest.approx(direct.conditioning.representations["px"].fjd, rel=1e-9)

    # PNGs: every FD sample, per class, as produced (clamped), named by its index i (label i % C)
    for folder in folders.values():
        for c in range(C):
            files = sorted((tmp_path / SAMPLES_DIRNAME / folder / str(c)).glob("*.png"))
            assert [f.name for f in files] == [f"{i:06d}.png" for i in range(c, n, C)]
    assert not (tmp_path / SAMPLES_DIRNAME / "ignorer").exists()
    teacher_class_1 = [np.asarray(Image.open(f)) for f in sorted((tmp_path / SAMPLES_DIRNAME / "teacher" / "1").glob("*.png"))]
    expected = ((samples[labels == 1, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(np.stack(teacher_class_1), expected)

    # the grid: per generator a block of C rows x gpc columns (48-pixel cells, 2-pixel padding)
    grid = Image.open(tmp_path / "comparison_grid.png")
    block_w, block_h = gpc * 50 + 2, C * 50 + 2
    assert grid.size == (3 * block_w + 2 * 16, 28 + block_h)

    table = (tmp_path / "comparison.md").read_text()
    assert "**Conditioning.**" in table and "DeVries et al. 2019" in table
    assert "| generator | adherence (%) | per-class FD px (held out) | FJD px (held out) |" in table
    assert "| follows its label | 100.0 |" in table
    assert table == format_markdown_table(report)

    # a second run replaces a folder's PNGs (fewer samples now: no stale files left)
    compare_generators({"follows its label": follower}, encoders, references, num_samples=6, output_dir=tmp_path,
                       num_classes=C, sample_folders={"follows its label": "follower"}, grid_samples=0)
    assert sorted(p.name for p in (tmp_path / SAMPLES_DIRNAME / "follower" / "0").glob("*.png")) == ["000000.png", f"{C:06d}.png"]


def test_conditional_grid_rows_are_the_classes(tmp_path):
    """Row c of a block holds gpc images of class c: the painted brightness, read back from the PNG."""
    encoders, references, _ = pixel_setup()
    compare_generators({"follower": follower}, encoders, references, num_samples=6, output_dir=tmp_path,
                       num_classes=C, grid_per_class=2)
    canvas = np.asarray(Image.open(tmp_path / "comparison_grid.png").convert("L")).astype(float)
    for c in range(C):
        for col in range(2):
            y, x = 28 + 2 + c * 50, 2 + col * 50
            cell = canvas[y : y + 48, x : x + 48]
            assert abs(cell.mean() / 127.5 - 1 - (c - 1)) < 0.1


def test_unconditional_samples_go_to_one_folder(tmp_path):
    encoders, references, _ = pixel_setup()

    def noise(batch_size, generator):  # an unconditional generator takes two arguments
        return torch.rand(batch_size, 1, 8, 8, generator=generator) * 2 - 1

    report = compare_generators({"noise": noise}, encoders, references, num_samples=5, output_dir=tmp_path,
                                sample_folders={"noise": "noise"}, grid_samples=0, batch_size=2)
    files = sorted((tmp_path / SAMPLES_DIRNAME / "noise").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    assert "num_classes" not in report and "adherence" not in report["generators"]["noise"]
    assert "Conditioning" not in (tmp_path / "comparison.md").read_text()


def test_conditional_settings_are_checked_before_sampling(tmp_path):
    encoders, references, class_refs = pixel_setup()
    kwargs = dict(num_samples=6, grid_samples=0)
    with pytest.raises(ValueError, match="need num_classes"):
        compare_generators({"f": follower}, encoders, references, class_references=class_refs, **kwargs)
    with pytest.raises(ValueError, match="have 3 classes, num_classes is 4"):
        compare_generators({"f": follower}, encoders, references, num_classes=4, class_references=class_refs, **kwargs)
    with pytest.raises(ValueError, match="not among the encoders"):
        compare_generators({"f": follower}, encoders, references, num_classes=C, class_references={"dino": class_refs["px"]},
                           **kwargs)
    with pytest.raises(ValueError, match="2 samples per class"):
        compare_generators({"f": follower}, encoders, references, num_classes=C, class_references=class_refs,
                           num_samples=5, grid_samples=0)
    with pytest.raises(ValueError, match="pass output_dir"):
        compare_generators({"f": follower}, encoders, references, num_classes=C, sample_folders={"f": "f"}, **kwargs)
    with pytest.raises(ValueError, match="not among the generators"):
        compare_generators({"f": follower}, encoders, references, num_classes=C, sample_folders={"g": "g"},
                           output_dir=tmp_path, **kwargs)
    with pytest.raises(ValueError, match="plain folder names"):
        compare_generators({"f": follower}, encoders, references, num_classes=C, sample_folders={"f": "a/b"},
                           output_dir=tmp_path, **kwargs)
    with pytest.raises(ValueError, match="predictions callable"):
        compare_generators({"f": follower}, encoders, references, classifier=read_brightness, **kwargs)


def test_seed_spread_of_conditional_generators_has_adherence_and_per_class_fd(tmp_path):
    encoders, references, class_refs = pixel_setup()
    generators = {"follower": follower, "ignorer": ignorer}
    settings = dict(num_classes=C, class_references=class_refs, classifier=read_brightness)
    spread = seed_spread(generators, encoders, references, seeds=[0, 1], num_samples=12, output_dir=tmp_path,
                         **settings)
    runs = [compare_generators(generators, encoders, references, num_samples=12, grid_samples=0, seed=s, **settings)
            for s in (0, 1)]
    assert spread["num_classes"] == C and spread["conditioning_representations"] == ["px"]
    for gname in generators:
        cond = spread["conditioning"][gname]
        assert cond["adherence"]["values"] == [r["generators"][gname]["adherence"] for r in runs]
        assert cond["per_class_fd"]["px"]["values"] == [r["generators"][gname]["conditioning"]["px"]["per_class_fd"]
                                                        for r in runs]
        assert cond["fjd"]["px"]["values"] == [r["generators"][gname]["conditioning"]["px"]["fjd"] for r in runs]
        assert spread["generators"][gname]["px"]["values"] == [r["generators"][gname]["fd"]["px"] for r in runs]
    assert spread["conditioning"]["follower"]["adherence"]["mean"] == 1.0
    table = (tmp_path / "seed_spread.md").read_text()
    assert "**Conditioning**" in table and "| follower | 100.0 ± 0.0 |" in table and "per-class FD px" in table
    # a known report with the same conditioning stands in for its seed; one without num_classes does not
    marked = json.loads(json.dumps(runs[0]))
    marked["generators"]["follower"]["adherence"] = 0.25
    unconditional = json.loads(json.dumps(marked))
    unconditional["seed"] = 1
    del unconditional["num_classes"]
    again = seed_spread(generators, encoders, references, seeds=[0, 1], num_samples=12,
                        known_reports=[marked, unconditional], **settings)
    assert again["conditioning"]["follower"]["adherence"]["values"] == [0.25, 1.0]


def _run_report(seed, student_pcfd, teacher_pcfd, adherence):
    rep = {"held_out": True, "encoder_id": "e", "feature_dim": 2, "validation_fd": None}
    def gen(pcfd, adh):
        return {"fd": {"px": 2 * pcfd}, "adherence": adh,
                "conditioning": {"px": {"per_class_fd": pcfd, "fjd": pcfd / 2, "class_fd": {}}}}
    return {"num_samples": 100, "seed": seed, "num_classes": 3, "conditioning_representations": ["px"],
            "representations": {"px": rep, "train": {**rep, "held_out": False}},
            "generators": {"student": gen(student_pcfd, adherence), "teacher": gen(teacher_pcfd, 0.9)}}


def test_training_runs_table_gives_mean_and_std_over_runs_and_per_run_ratios_to_the_baseline(tmp_path):
    from fd_onestep.demos.digits.__main__ import main
    from fd_onestep.comparison.report import format_training_runs_table

    joint = [_run_report(0, 1.0, 2.0, 0.99), _run_report(1, 3.0, 2.0, 0.97)]
    table = format_training_runs_table({"joint": joint}, "student", "teacher")
    header = ("| generator | runs | adherence (%) | FD px | per-class FD px | per-class FD px / baseline | FJD px |")
    assert header in table  # held-out representations only
    # per-class FD 1 and 3 (mean 2, std 1.414), ratios 0.5 and 1.5 to the same run's teacher (mean 1, std 0.707)
    assert "| student, joint | 2 | 98.0 ± 1.4 | 4.000 ± 2.828 | 2.000 ± 1.414 | 1.000 ± 0.707 | 1.000 ± 0.707 |" in table
    assert "| teacher | 2 | 90.0 ± 0.0 | 4.000 ± 0 | 2.000 ± 0 | 1.000 ± 0 | 1.000 ± 0 |" in table
    with pytest.raises(ValueError, match="has no generator"):
        format_training_runs_table({"joint": joint}, "student", "nobody")
    for seed, report in enumerate(joint):  # the command line reads the runs' comparison.json
        (tmp_path / f"run{seed}").mkdir()
        (tmp_path / f"run{seed}" / "comparison.json").write_text(json.dumps(report))
    main(["--output_dir", str(tmp_path / "summary"), "--student", "student", "--baseline", "teacher",
          "--summarize", f"joint={tmp_path / 'run0'},{tmp_path / 'run1'}"])
    assert (tmp_path / "summary" / "training_runs.md").read_text() == table
