"""The measurement: sample every generator, FD in every representation, class coverage; FD over seeds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .generators import GeneratorFn
from .report import (
    GRID_FILENAME,
    JSON_FILENAME,
    SPREAD_JSON_FILENAME,
    SPREAD_TABLE_FILENAME,
    TABLE_FILENAME,
    format_markdown_table,
    format_seed_spread_table,
    save_comparison_grid,
    write_report,
)

__all__ = ["compare_generators", "seed_spread"]


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
    from ..evaluation import evaluate_images

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
            from ..digits import class_histogram

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
        if grid_samples:
            save_comparison_grid(grid_blocks, Path(output_dir) / GRID_FILENAME)
        write_report(report, output_dir, format_markdown_table(report), TABLE_FILENAME, JSON_FILENAME)
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
        write_report(report, output_dir, format_seed_spread_table(report), SPREAD_TABLE_FILENAME, SPREAD_JSON_FILENAME)
    return report
