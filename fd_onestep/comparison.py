"""Compare several image generators side by side: sample grid, FD in every representation, class coverage.

The question this answers is the one the method makes a claim about: is a one-step student as good as its
teacher's multi-step sampler, and much better than the naive one-step use of the teacher -- measured in
every given representation, including ones that were *held out* of the training loss (a training FD that
falls while a held-out FD rises means the generator is fooling the training encoders).

A generator is any callable ``generate(batch_size: int, generator: torch.Generator) -> Tensor`` returning
float images (batch_size, C, H, W) in [-1, 1]. Every generator gets the same random streams (the grid is
drawn from ``seed``, the FD population from ``seed + 1``), so generators that draw their noise the same
way (e.g. a teacher and its one-step student) show the same noise in the same grid cell.

``compare_generators`` writes to ``output_dir``:

- ``comparison_grid.png``: one labelled block per generator, ``grid_samples`` images each;
- ``comparison.md``: the FD table (one column per representation, held-out ones marked, FD_r = FD /
  validation FD where the reference statistics carry a ``validation_fd``), plus the class histogram
  summary when a classifier is given;
- ``comparison.json``: the same numbers, machine-readable (structure in :func:`compare_generators`).

FD of N samples is itself a random number. ``seed_spread`` repeats the FD measurement over several seeds
and reports each FD's mean and standard deviation, so that "1.38x the teacher" can be read against the noise
of the measurement (``seed_spread.md`` / ``seed_spread.json``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch

__all__ = [
    "GeneratorFn",
    "compare_generators",
    "teacher_sampler",
    "naive_one_step_teacher",
    "one_step_pipeline",
    "seed_spread",
    "format_markdown_table",
    "format_seed_spread_table",
    "save_comparison_grid",
    "digits_generators",
    "digits_teacher_baselines",
]

GeneratorFn = Callable[[int, torch.Generator], torch.Tensor]

GRID_FILENAME = "comparison_grid.png"
TABLE_FILENAME = "comparison.md"
JSON_FILENAME = "comparison.json"
SPREAD_TABLE_FILENAME = "seed_spread.md"
SPREAD_JSON_FILENAME = "seed_spread.json"


# --------------------------------------------------------------------------------------------------------
# Generators built from a diffusers teacher pipeline (unconditional: a ``unet`` and a ``scheduler``).


def _check_unconditional(pipeline) -> None:
    for attr in ("unet", "scheduler"):
        if not hasattr(pipeline, attr):
            raise TypeError(
                f"{type(pipeline).__name__} has no `{attr}`; pass an unconditional diffusers pipeline such as "
                "DDPMPipeline (a UNet2DModel `unet` and a scheduler)."
            )


def _image_shape(unet, batch_size: int) -> tuple[int, ...]:
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (batch_size, unet.config.in_channels, *size)


def teacher_sampler(
    pipeline,
    num_inference_steps: int = 20,
    scheduler: str = "dpmsolver++",
) -> GeneratorFn:
    """The teacher's own multi-step sampler as a generator callable.

    Args:
        pipeline: an unconditional diffusers pipeline (``DDPMPipeline``); its weights are not copied.
        num_inference_steps: solver steps (each one UNet evaluation).
        scheduler: ``"dpmsolver++"`` (``DPMSolverMultistepScheduler``, 2nd order), ``"ddim"``
            (``DDIMScheduler``, eta = 0) or ``"ddpm"`` (the pipeline's own ancestral ``DDPMScheduler``);
            built with ``from_config`` of the teacher's scheduler, so prediction type, betas (zero terminal
            SNR included) and timestep spacing are the teacher's.
    Returns:
        ``generate(batch_size, generator) -> (batch_size, C, H, W) float32 in [-1, 1]``.
    """
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler

    _check_unconditional(pipeline)
    classes = {"dpmsolver++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if scheduler not in classes:
        raise ValueError(f"unknown sampler {scheduler!r}; choose one of {sorted(classes)}.")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}.")
    sampler = DDPMPipeline(unet=pipeline.unet, scheduler=classes[scheduler].from_config(pipeline.scheduler.config))
    sampler.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def generate(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        images = sampler(
            batch_size=batch_size, generator=generator, num_inference_steps=num_inference_steps, output_type="pt"
        ).images  # [0, 1]
        return images * 2 - 1

    generate.description = f"{scheduler} {num_inference_steps} steps"
    return generate


def naive_one_step_teacher(pipeline, timestep: Optional[int] = None) -> GeneratorFn:
    """The teacher used naively in one step: pure noise at the top timestep, read the clean-sample estimate.

    x0 = (x_T - sqrt(1 - a_T) eps) / sqrt(a_T) (epsilon), sqrt(a_T) x_T - sqrt(1 - a_T) v (v-prediction),
    or the output itself (sample), with a_T = alphas_cumprod[timestep]. With zero-terminal-SNR betas
    a_T = 0 at T and the v-prediction estimate is exactly -v.

    Args:
        timestep: default the last training timestep (num_train_timesteps - 1).
    Returns:
        ``generate(batch_size, generator) -> (batch_size, C, H, W) float32``, *not* clamped (the comparison
        clamps to [-1, 1] as saving images would, and reports the clamped fraction).
    """
    _check_unconditional(pipeline)
    config = pipeline.scheduler.config
    t = int(config.num_train_timesteps - 1 if timestep is None else timestep)
    alpha_bar = pipeline.scheduler.alphas_cumprod[t].double()
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type == "epsilon" and float(alpha_bar) < 1e-8:
        raise ValueError(
            f"an epsilon-prediction teacher cannot predict x0 at t={t}: alphas_cumprod[t]={float(alpha_bar):.3g}; "
            "pass a smaller timestep."
        )
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}: use epsilon, v_prediction or sample.")
    a, s = alpha_bar.sqrt().item(), (1 - alpha_bar).sqrt().item()
    unet = pipeline.unet

    @torch.no_grad()
    def generate(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        device = unet.device
        x_t = torch.randn(_image_shape(unet, batch_size), generator=generator, device=generator.device).to(
            device, unet.dtype
        )
        out = unet(x_t, torch.full((batch_size,), t, device=device)).sample.float()
        if prediction_type == "v_prediction":
            return a * x_t.float() - s * out
        if prediction_type == "epsilon":
            return (x_t.float() - s * out) / a
        return out

    generate.description = f"1 step (x0 estimate at t={t})"
    return generate


def one_step_pipeline(pipeline) -> GeneratorFn:
    """A trained unconditional ``FDOneStepPipeline`` (e.g. ``FDOneStepPipeline.from_pretrained(output_dir)``)
    as a generator callable: one denoiser forward per batch, with the pipeline's own noise draw and output
    bound.

    Returns:
        ``generate(batch_size, generator) -> (batch_size, C, H, W) float32`` in [-1, 1].
    """
    if getattr(pipeline, "is_text_conditional", False) or getattr(pipeline, "is_class_conditional", False):
        raise ValueError(
            "one_step_pipeline takes an unconditional FDOneStepPipeline; wrap a conditional one in your own "
            "generate(batch_size, generator) that picks the prompts or class labels."
        )

    @torch.no_grad()
    def generate(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        images = pipeline(batch_size=batch_size, generator=generator, output_type="pt").images  # [0, 1]
        return images * 2 - 1

    generate.description = "1 step"
    return generate


# --------------------------------------------------------------------------------------------------------
# Grid, table.


def save_comparison_grid(blocks: Mapping[str, torch.Tensor], path, nrow: Optional[int] = None, cell: int = 48) -> Path:
    """One labelled block per generator, side by side.

    Args:
        blocks: name -> images (n, C, H, W) in [-1, 1] (same n, C for all).
        nrow: images per block row (default ceil(sqrt(n))).
        cell: pixels per image side in the PNG (nearest-neighbour upscale: small images stay crisp).
    """
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    if not blocks:
        raise ValueError("no generator samples to draw; pass at least one generator.")
    tiles = []
    for name, images in blocks.items():
        n = images.shape[0]
        per_row = nrow or max(1, math.ceil(math.sqrt(n)))
        x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = torch.nn.functional.interpolate(x, size=(cell, cell), mode="nearest")
        grid = make_grid(x, nrow=per_row, padding=2, pad_value=1.0)
        tiles.append((name, Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))))
    font = ImageFont.load_default()
    label_h, gap = 28, 16
    width = sum(t.width for _, t in tiles) + gap * (len(tiles) - 1)
    height = max(t.height for _, t in tiles) + label_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x0 = 0
    for name, tile in tiles:
        canvas.paste(tile, (x0, label_h))
        draw.text((x0 + 4, 6), name, fill="black", font=font)
        x0 += tile.width + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _fmt(value, digits=3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.{digits}g}" if abs(value) < 0.01 else f"{value:.{digits}f}"


def format_markdown_table(report: dict) -> str:
    """The markdown of a ``compare_generators`` report (FD table, then the class histogram table)."""
    reps = report["representations"]
    header = ["generator"]
    for name, info in reps.items():
        mark = " (held out)" if info["held_out"] else ""
        header.append(f"FD {name}{mark}")
        if info["validation_fd"] is not None:
            header.append(f"FD_r {name}")
    k = sum(info["validation_fd"] is not None for info in reps.values())
    if k:
        header.append(f"FD_r^{k} (mean FD_r)")
    lines = [
        f"FD of {report['num_samples']} samples per generator against the reference statistics "
        f"(seed {report['seed']}). Held out = never used in the training loss. "
        "FD_r = FD / FD(validation split); the validation row is FD_r = 1 by definition.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    if any(info["validation_fd"] is not None for info in reps.values()):
        row = ["validation split (reference)"]
        for info in reps.values():
            row.append(_fmt(info["validation_fd"]))
            if info["validation_fd"] is not None:
                row.append("1.000")
        row.append("1.000")
        lines.append("| " + " | ".join(row) + " |")
    for gname, result in report["generators"].items():
        row = [gname]
        for name, info in reps.items():
            row.append(_fmt(result["fd"][name]))
            if info["validation_fd"] is not None:
                row.append(_fmt(result["fd_r"][name]))
        if k:
            row.append(_fmt(result.get("fd_r_k")))
        lines.append("| " + " | ".join(row) + " |")

    histograms = {g: r["class_histogram"] for g, r in report["generators"].items() if r.get("class_histogram")}
    if histograms:
        num_classes = len(next(iter(histograms.values()))["counts"])
        lines += [
            "",
            "Class histogram of the samples under the digit classifier (share of samples per class, %); "
            "max dev = max over classes of |share - uniform| / uniform.",
            "",
            "| generator | " + " | ".join(str(c) for c in range(num_classes)) + " | classes | max dev | mean conf |",
            "|---|" + "---:|" * (num_classes + 3),
        ]
        for gname, hist in histograms.items():
            shares = " | ".join(f"{100 * f:.1f}" for f in hist["frequencies"])
            lines.append(
                f"| {gname} | {shares} | {hist['classes_present']} | {100 * hist['max_relative_deviation']:.0f}% "
                f"| {hist['mean_confidence']:.2f} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# The comparison.


def _generate(fn: GeneratorFn, name: str, n: int, batch_size: int, generator: torch.Generator):
    """Call ``fn`` in batches; yields (batch float32 clamped to [-1, 1] on CPU, clamped pixel count)."""
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        images = fn(b, generator)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] != b:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"generator {name!r} returned {shape} for batch_size={b}; it must return a float tensor "
                f"({b}, C, H, W) in [-1, 1]."
            )
        images = images.detach().float()
        if not bool(torch.isfinite(images).all()):
            raise ValueError(f"generator {name!r} produced NaN/Inf pixels; check the model before comparing it.")
        clamped = int(((images < -1) | (images > 1)).sum())
        done += b
        yield images.clamp(-1, 1), clamped


def compare_generators(
    generators: Mapping[str, GeneratorFn],
    encoders: Mapping[str, "torch.nn.Module"],
    references: Mapping[str, object],
    *,
    num_samples: int = 1000,
    output_dir=None,
    held_out: Iterable[str] = (),
    classifier=None,
    grid_samples: int = 64,
    batch_size: int = 250,
    seed: int = 0,
) -> dict:
    """Sample every generator, measure FD in every representation, and write the grid and tables.

    Args:
        generators: display name -> ``generate(batch_size, torch.Generator) -> (B, C, H, W)`` in [-1, 1]
            (outputs are clamped to [-1, 1] before measuring, as saving images would; the clamped share of
            pixels is reported).
        encoders: representation name -> ``FeatureEncoder`` (images in [-1, 1] -> (N, d)).
        references: representation name -> ``ReferenceStats`` of the real data for that encoder (checked with
            ``check_compatible(encoder.encoder_id, encoder.feature_dim)``); its ``validation_fd`` gives FD_r.
        num_samples: samples per generator for FD (and the class histogram).
        output_dir: where to write ``comparison_grid.png``, ``comparison.md``, ``comparison.json``; None
            writes nothing and only returns the report.
        held_out: representation names that were not used in training (marked in the table).
        classifier: ``(model, image_processor)`` digit classifier (``fd_onestep.digits.load_digit_classifier``)
            for the class histogram, or None to skip it.
        grid_samples: images per generator in the grid (0: no grid).
        batch_size: images per generator call.
        seed: the grid uses ``torch.Generator().manual_seed(seed)``, the FD samples ``seed + 1``; every
            generator gets fresh generators with these seeds.

    Returns:
        The report dict (also ``comparison.json``)::

            {"num_samples": int, "seed": int, "grid": "comparison_grid.png" | None,
             "representations": {rep: {"encoder_id": str, "feature_dim": int, "held_out": bool,
                                       "validation_fd": float | None}},
             "generators": {name: {"fd": {rep: float}, "fd_r": {rep: float | None}, "fd_r_k": float | None,
                                   "class_histogram": dict | None, "clamped_fraction": float,
                                   "seconds": float}}}
    """
    from .evaluation import evaluate_images

    if not generators:
        raise ValueError("no generators to compare; pass {name: generate(batch_size, generator)}.")
    if set(encoders) != set(references):
        raise ValueError(
            f"encoders {sorted(encoders)} and references {sorted(references)} must have the same names: "
            "every representation needs its encoder and its reference statistics."
        )
    held_out = set(held_out)
    unknown = held_out - set(encoders)
    if unknown:
        raise ValueError(f"held_out names {sorted(unknown)} are not among the encoders {sorted(encoders)}.")
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2 (a covariance needs two samples), got {num_samples!r}.")
    for name, encoder in encoders.items():
        references[name].check_compatible(encoder.encoder_id, encoder.feature_dim)

    representations = {
        name: {
            "encoder_id": encoder.encoder_id,
            "feature_dim": int(encoder.feature_dim),
            "held_out": name in held_out,
            "validation_fd": None if references[name].validation_fd is None else float(references[name].validation_fd),
        }
        for name, encoder in encoders.items()
    }
    results, grid_blocks = {}, {}
    device = next(iter(encoders.values())).device
    for gname, fn in generators.items():
        start = time.time()
        if grid_samples:
            grid_gen = torch.Generator().manual_seed(seed)
            grid_blocks[gname] = torch.cat([b for b, _ in _generate(fn, gname, grid_samples, batch_size, grid_gen)])
        kept, counts = [], {"clamped": 0, "pixels": 0}

        def batches():
            for images, n_clamped in _generate(fn, gname, num_samples, batch_size, torch.Generator().manual_seed(seed + 1)):
                counts["clamped"] += n_clamped
                counts["pixels"] += images.numel()
                if classifier is not None:
                    kept.append(images)
                yield images.to(device)

        evaluation = evaluate_images(batches(), encoders, references)
        fd = {name: evaluation.representations[name].fd for name in encoders}
        fd_r = {name: evaluation.representations[name].fd_r for name in encoders}
        histogram = None
        if classifier is not None:
            from .digits import class_histogram

            histogram = class_histogram(torch.cat(kept), classifier)
        results[gname] = {
            "fd": fd,
            "fd_r": fd_r,
            "fd_r_k": evaluation.fd_r_k,
            "class_histogram": histogram,
            "clamped_fraction": counts["clamped"] / max(counts["pixels"], 1),
            "seconds": round(time.time() - start, 2),
        }

    report = {
        "num_samples": num_samples,
        "seed": seed,
        "grid": GRID_FILENAME if (grid_samples and output_dir is not None) else None,
        "representations": representations,
        "generators": results,
    }
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if grid_samples:
            save_comparison_grid(grid_blocks, output_dir / GRID_FILENAME)
        (output_dir / TABLE_FILENAME).write_text(format_markdown_table(report))
        (output_dir / JSON_FILENAME).write_text(json.dumps(report, indent=1) + "\n")
    return report


def seed_spread(
    generators: Mapping[str, GeneratorFn],
    encoders: Mapping[str, "torch.nn.Module"],
    references: Mapping[str, object],
    *,
    seeds: Iterable[int],
    num_samples: int = 1000,
    output_dir=None,
    held_out: Iterable[str] = (),
    batch_size: int = 250,
    known_reports: Iterable[dict] = (),
) -> dict:
    """FD of every generator in every representation, repeated over ``seeds``: mean and standard deviation.

    Each seed is one :func:`compare_generators` run (its FD samples come from ``seed + 1``), so the spread is
    the sampling noise of an N-sample FD of that generator (the model is fixed). ``known_reports`` are
    :func:`compare_generators` reports already made with the same generators, encoders and ``num_samples``;
    a seed that one of them covers is taken from it instead of being measured again.

    Returns (also ``seed_spread.json``; ``seed_spread.md`` is the table)::

        {"num_samples": int, "seeds": [int], "representations": {rep: {"held_out": bool}},
         "generators": {name: {rep: {"mean": float, "std": float (n - 1), "values": [float per seed]}}}}
    """
    seeds = [int(x) for x in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seed_spread needs at least two distinct seeds, got {seeds}.")
    held_out = set(held_out)
    known = {
        r["seed"]: r for r in known_reports
        if r["num_samples"] == num_samples and set(r["generators"]) == set(generators)
        and set(r["representations"]) == set(encoders)
    }
    runs = [
        known.get(seed) or compare_generators(generators, encoders, references, num_samples=num_samples,
                                              held_out=held_out, grid_samples=0, batch_size=batch_size, seed=seed)
        for seed in seeds
    ]
    spread = {}
    for gname in generators:
        spread[gname] = {}
        for rep in encoders:
            values = torch.tensor([run["generators"][gname]["fd"][rep] for run in runs], dtype=torch.float64)
            spread[gname][rep] = {"mean": float(values.mean()), "std": float(values.std()), "values": values.tolist()}
    report = {
        "num_samples": num_samples,
        "seeds": seeds,
        "representations": {rep: {"held_out": rep in held_out} for rep in encoders},
        "generators": spread,
    }
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / SPREAD_TABLE_FILENAME).write_text(format_seed_spread_table(report))
        (output_dir / SPREAD_JSON_FILENAME).write_text(json.dumps(report, indent=1) + "\n")
    return report


def format_seed_spread_table(report: dict) -> str:
    """The markdown of a :func:`seed_spread` report: ``mean ± std`` of FD per generator and representation."""
    reps = report["representations"]
    header = ["generator"] + [f"FD {rep}" + (" (held out)" if info["held_out"] else "") for rep, info in reps.items()]
    lines = [
        f"FD of {report['num_samples']} samples, mean ± standard deviation over {len(report['seeds'])} seeds "
        f"({', '.join(map(str, report['seeds']))}): the spread is the sampling noise of the measurement.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(reps)) + "|",
    ]
    for gname, per_rep in report["generators"].items():
        cells = [f"{_fmt(per_rep[rep]['mean'])} ± {_fmt(per_rep[rep]['std'])}" for rep in reps]
        lines.append("| " + " | ".join([gname] + cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# The bundled digits teacher's baselines: ``python -m fd_onestep.comparison --output_dir DIR``.


def digits_generators(
    *,
    sampler: str = "dpmsolver++",
    num_inference_steps: int = 20,
    extra_samplers: Iterable[tuple[str, int]] = (),
    students: Mapping[str, object] = {},
    device=None,
) -> dict:
    """The bundled digits teacher used naively in one step and with its multi-step sampler(s), plus any trained
    one-step students (display name -> output folder of ``train_fd_onestep.py``, loaded with
    ``FDOneStepPipeline.from_pretrained``), as generator callables for :func:`compare_generators`."""
    from . import digits

    teacher = digits.load_digits_teacher(device)
    generators = {
        "teacher, 1 step (naive)": naive_one_step_teacher(teacher),
        f"teacher, {sampler} {num_inference_steps} steps": teacher_sampler(teacher, num_inference_steps, sampler),
    }
    for name, steps in extra_samplers:
        generators[f"teacher, {name} {steps} steps"] = teacher_sampler(teacher, steps, name)
    if students:
        from .pipelines.pipeline_fd_onestep import FDOneStepPipeline

        for name, folder in students.items():
            pipe = FDOneStepPipeline.from_pretrained(str(folder), local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            generators[name] = one_step_pipeline(pipe.to(device) if device is not None else pipe)
    return generators


def digits_teacher_baselines(
    output_dir=None,
    *,
    num_samples: int = 2000,
    sampler: str = "dpmsolver++",
    num_inference_steps: int = 20,
    extra_samplers: Iterable[tuple[str, int]] = (),
    students: Mapping[str, object] = {},
    seed: int = 0,
    spread_seeds: Iterable[int] = (),
    device=None,
) -> dict:
    """Compare the bundled digits teacher used naively in one step with its multi-step sampler (and any trained
    ``students``, see :func:`digits_generators`), in every bundled representation (training and held out), with
    the digit classifier's class histogram.

    These are the targets of the offline default: the student's held-out FD should be <= 1.5x the multi-step
    teacher's and >= 10x below the naive one-step teacher's. With ``spread_seeds`` (two or more), the FDs are
    also repeated over those seeds and ``seed_spread.md`` / ``.json`` written (:func:`seed_spread`).
    """
    from . import digits

    generators = digits_generators(sampler=sampler, num_inference_steps=num_inference_steps,
                                   extra_samplers=extra_samplers, students=students, device=device)
    names = digits.TRAINING_ENCODERS + digits.HELD_OUT_ENCODERS
    encoders = digits.load_bundled_encoders(names, device=device)
    references = digits.load_bundled_references(names)
    report = compare_generators(
        generators,
        encoders,
        references,
        num_samples=num_samples,
        output_dir=output_dir,
        held_out=set(digits.HELD_OUT_ENCODERS),
        classifier=digits.load_digit_classifier(device=device),
        seed=seed,
    )
    spread_seeds = list(spread_seeds)
    if spread_seeds:
        seed_spread(generators, encoders, references, seeds=spread_seeds, num_samples=num_samples,
                    output_dir=output_dir, held_out=set(digits.HELD_OUT_ENCODERS), known_reports=[report])
    return report


def _student_arg(item: str) -> tuple[str, str]:
    name, sep, folder = item.partition("=")
    if not sep or not name or not folder:
        raise ValueError(f"--students takes NAME=FOLDER (e.g. 'beta 0.8=runs/b08'), got {item!r}")
    return name, folder


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        description="FD of the bundled digits teacher (naive one step vs its sampler) and of trained students.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--sampler", default="dpmsolver++", choices=["dpmsolver++", "ddim", "ddpm"])
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument(
        "--extra", nargs="*", default=[], metavar="SAMPLER:STEPS", help="more samplers to compare, e.g. ddim:50"
    )
    parser.add_argument(
        "--students", nargs="*", default=[], metavar="NAME=FOLDER",
        help="one-step pipelines written by train_fd_onestep.py to compare too, e.g. 'student=digits-onestep'",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--spread_seeds", type=int, nargs="*", default=[], metavar="SEED",
        help="repeat the FDs over these seeds (two or more) and write seed_spread.md / .json (mean ± std)",
    )
    args = parser.parse_args(argv)
    extra = []
    for item in args.extra:
        name, _, steps = item.partition(":")
        if not steps.isdigit():
            parser.error(f"--extra takes SAMPLER:STEPS (e.g. ddim:50), got {item!r}")
        extra.append((name, int(steps)))
    try:
        students = dict(_student_arg(item) for item in args.students)
    except ValueError as err:
        parser.error(str(err))
    seeds = args.spread_seeds
    if seeds and (len(seeds) < 2 or len(set(seeds)) != len(seeds)):
        # checked before minutes of sampling, not after
        parser.error(f"--spread_seeds needs two or more seeds, all distinct, got {seeds} (a standard deviation "
                     "of one value is undefined)")
    digits_teacher_baselines(
        args.output_dir,
        num_samples=args.num_samples,
        sampler=args.sampler,
        num_inference_steps=args.num_inference_steps,
        extra_samplers=extra,
        students=students,
        seed=args.seed,
        spread_seeds=args.spread_seeds,
    )
    print(Path(args.output_dir, TABLE_FILENAME).read_text())
    if args.spread_seeds:
        print(Path(args.output_dir, SPREAD_TABLE_FILENAME).read_text())


if __name__ == "__main__":
    main()
