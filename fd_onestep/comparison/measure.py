"""The measurement: sample every generator, FD in every representation, class coverage; FD over seeds.

Class-conditional generators (``num_classes`` given) also get adherence, per-class FD and FJD
(:func:`fd_onestep.evaluation.evaluate_images` with labels), and their samples can be written as PNGs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch

from .generators import GeneratorFn
from .report import (
    GRID_FILENAME,
    JSON_FILENAME,
    SAMPLES_DIRNAME,
    SPREAD_JSON_FILENAME,
    SPREAD_TABLE_FILENAME,
    TABLE_FILENAME,
    format_markdown_table,
    format_seed_spread_table,
    save_comparison_grid,
    write_report,
)

__all__ = ["compare_generators", "seed_spread"]


def _generate(fn: GeneratorFn, name: str, n: int, batch_size: int, generator: torch.Generator,
              labels: Optional[torch.Tensor] = None):
    """Call ``fn`` in batches; yields (batch float32 clamped to [-1, 1] on CPU, clamped pixel count, batch labels).

    ``labels``: (n,) int64 requested classes, passed batch by batch as ``fn(b, generator, labels[i:i + b])``;
    None calls ``fn(b, generator)`` and yields None as the batch labels.
    """
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        batch_labels = None if labels is None else labels[done : done + b]
        # inference mode: no autograd bookkeeping in the samplers (a 20-step teacher ran ~5% faster, the same
        # bits); the images are only read afterwards
        with torch.inference_mode():
            images = fn(b, generator) if batch_labels is None else fn(b, generator, batch_labels)
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
        yield images.clamp(-1, 1), clamped, batch_labels


def _label_predictor(classifier) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """``images (B, C, H, W) in [-1, 1] -> predicted classes int64 (B,)`` from a ``(model, image_processor)``
    image classifier (:func:`fd_onestep.classifiers.load_image_classifier`) or such a callable itself; None stays
    None."""
    if classifier is None or callable(classifier):
        return classifier
    from ..classifiers import label_predictor

    return label_predictor(classifier)


class _SampleWriter:
    """Writes a generator's samples as PNGs while they stream: ``folder/<index:06d>.png`` or, with labels,
    ``folder/<label>/<index:06d>.png``, ``index`` the sample's position in the stream
    (:func:`fd_onestep.images.save_images`, the training script's naming)."""

    def __init__(self, folder: Path):
        # a previous run's files would mix with this one's (more samples then, or other classes)
        shutil.rmtree(folder, ignore_errors=True)
        self.folder = folder
        self.written = 0

    def __call__(self, images: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        from ..images import save_images

        save_images(images, self.folder, start_index=self.written, labels=labels)
        self.written += images.shape[0]


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
    num_classes: Optional[int] = None,
    class_references: Optional[Mapping[str, object]] = None,
    classifier_name: Optional[str] = None,
    sample_folders: Optional[Mapping[str, str]] = None,
    grid_per_class: int = 8,
) -> dict:
    """Sample every generator, measure FD in every representation, and write the grid and tables.

    Args:
        generators: display name -> ``generate(batch_size, torch.Generator) -> (B, C, H, W)`` in [-1, 1]
            (outputs are clamped to [-1, 1] before measuring, as saving images would; the clamped share of
            pixels is reported); with ``num_classes``: ``generate(batch_size, generator, class_labels)``,
            ``class_labels`` (batch_size,) int64.
        encoders: representation name -> ``FeatureEncoder`` (images in [-1, 1] -> (N, d)).
        references: representation name -> ``ReferenceStats`` of the real data for that encoder (checked with
            ``check_compatible(encoder.encoder_id, encoder.feature_dim)``); its ``validation_fd`` gives FD_r.
        num_samples: samples per generator for FD (and the class histogram).
        output_dir: where to write ``comparison_grid.png``, ``comparison.md``, ``comparison.json``; None
            writes nothing and only returns the report.
        held_out: representation names that were not used in training (marked in the table).
        classifier: ``(model, image_processor)`` digit classifier (``fd_onestep.demos.digits.load_digit_classifier``)
            for the class histogram, or None to skip it. With ``num_classes`` it also gives adherence (through
            ``fd_onestep.demos.digits.classify_digits``); there it may also be a callable ``images -> predicted
            classes int64 (B,)`` (adherence only, no histogram).
        grid_samples: images per generator in the grid (0: no grid).
        batch_size: images per generator call.
        seed: the grid uses ``torch.Generator().manual_seed(seed)``, the FD samples ``seed + 1``; every
            generator gets fresh generators with these seeds.
        num_classes: None: unconditional generators. C: class-conditional ones; the FD samples request the
            balanced labels ``arange(num_samples) % C`` and the grid ``grid_per_class`` images of every class,
            one row per class (``grid_samples`` then only switches the grid off when 0).
        class_references: ``{rep: ClassConditionalStats}`` (C classes) for some of the encoders: per-class FD
            (mean over classes) and FJD in those representations; needs ``num_classes``.
        classifier_name: what the classifier is (reported with the adherence).
        sample_folders: ``{generator name: folder name}``: write those generators' FD samples (all
            ``num_samples``, clamped) as PNGs to ``output_dir/comparison_samples/<folder>/`` -- ``<index:06d>.png``,
            or ``<label>/<index:06d>.png`` with ``num_classes`` (index: the sample's, label ``index % C``); an existing folder of that
            name is replaced. Needs ``output_dir``.
        grid_per_class: images per class in the grid (class-conditional only).

    Returns:
        The report dict (also ``comparison.json``)::

            {"num_samples": int, "seed": int, "grid": "comparison_grid.png" | None,
             "representations": {rep: {"encoder_id": str, "feature_dim": int, "held_out": bool,
                                       "validation_fd": float | None}},
             "generators": {name: {"fd": {rep: float}, "fd_r": {rep: float | None}, "fd_r_k": float | None,
                                   "class_histogram": dict | None, "clamped_fraction": float,
                                   "seconds": float}}}

        With ``num_classes`` also ``"num_classes": int``, ``"conditioning_representations": [rep]`` (those with
        class references), ``"classifier": str | None`` and per generator ``"adherence": float | None`` and
        ``"conditioning": {rep: {"per_class_fd": float, "fjd": float, "class_fd": {str(c): float}}}``. With
        ``sample_folders`` also ``"sample_folders": {name: "comparison_samples/<folder>"}``.
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
    class_references = dict(class_references or {})
    _check_conditioning(encoders, num_classes, class_references, num_samples, classifier)
    sample_folders = dict(sample_folders or {})
    _check_sample_folders(sample_folders, generators, output_dir)
    conditional = num_classes is not None
    if conditional and (not isinstance(grid_per_class, int) or grid_per_class < 0):
        raise ValueError(f"grid_per_class must be an int >= 0 (0: no grid), got {grid_per_class!r}.")
    predict = _label_predictor(classifier) if conditional else None
    # the class histogram needs the (model, processor) classifier and the images (kept); adherence streams
    histogram_classifier = None if classifier is None or callable(classifier) else classifier
    fd_labels = torch.arange(num_samples) % num_classes if conditional else None
    grid_labels = torch.arange(num_classes).repeat_interleave(grid_per_class) if conditional else None
    grid_size = (grid_labels.numel() if conditional else grid_samples) if grid_samples else 0
    labeled = conditional and (bool(class_references) or predict is not None)

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
        if grid_size:
            grid_gen = torch.Generator().manual_seed(seed)
            grid_blocks[gname] = torch.cat(
                [b for b, _, _ in _generate(fn, gname, grid_size, batch_size, grid_gen, grid_labels)])
        kept, counts = [], {"clamped": 0, "pixels": 0}
        write = None
        if gname in sample_folders:
            write = _SampleWriter(Path(output_dir) / SAMPLES_DIRNAME / sample_folders[gname])

        def batches():
            fd_gen = torch.Generator().manual_seed(seed + 1)
            for images, n_clamped, labels in _generate(fn, gname, num_samples, batch_size, fd_gen, fd_labels):
                counts["clamped"] += n_clamped
                counts["pixels"] += images.numel()
                if write is not None:
                    write(images, labels)
                if histogram_classifier is not None:
                    kept.append(images)
                yield (images.to(device), labels) if labeled else images.to(device)

        evaluation = evaluate_images(batches(), encoders, references, class_references=class_references or None,
                                     classifier=predict, classifier_name=classifier_name)
        fd = {name: evaluation.representations[name].fd for name in encoders}
        fd_r = {name: evaluation.representations[name].fd_r for name in encoders}
        histogram = None
        if histogram_classifier is not None:
            from ..classifiers import class_histogram

            histogram = class_histogram(torch.cat(kept), histogram_classifier)
        results[gname] = {
            "fd": fd,
            "fd_r": fd_r,
            "fd_r_k": evaluation.fd_r_k,
            "class_histogram": histogram,
            "clamped_fraction": counts["clamped"] / max(counts["pixels"], 1),
            "seconds": round(time.time() - start, 2),
        }
        if conditional:
            results[gname].update(_conditioning_summary(evaluation.conditioning))

    report = {
        "num_samples": num_samples,
        "seed": seed,
        "grid": GRID_FILENAME if (grid_size and output_dir is not None) else None,
        "representations": representations,
        "generators": results,
    }
    if conditional:
        report["num_classes"] = int(num_classes)
        report["conditioning_representations"] = [name for name in encoders if name in class_references]
        report["classifier"] = classifier_name if classifier is not None else None
    if sample_folders:
        report["sample_folders"] = {g: f"{SAMPLES_DIRNAME}/{folder}" for g, folder in sample_folders.items()}
    if output_dir is not None:
        if grid_size:
            save_comparison_grid(grid_blocks, Path(output_dir) / GRID_FILENAME,
                                 nrow=grid_per_class if conditional else None)
        write_report(report, output_dir, format_markdown_table(report), TABLE_FILENAME, JSON_FILENAME)
    return report


def _check_conditioning(encoders, num_classes, class_references, num_samples, classifier) -> None:
    """Raise ``ValueError`` (before any sampling) for class-conditional settings that cannot be measured."""
    if num_classes is None:
        if class_references:
            raise ValueError("class_references need num_classes (the classes the generators are asked for).")
        if classifier is not None and callable(classifier):
            raise ValueError("an unconditional comparison takes the (model, image_processor) classifier for the class "
                             "histogram; a predictions callable only gives adherence, with num_classes.")
        return
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    unknown = sorted(set(class_references) - set(encoders))
    if unknown:
        raise ValueError(f"class_references for {unknown}, which are not among the encoders {sorted(encoders)}.")
    for name, ref in class_references.items():
        ref.check_compatible(encoders[name].encoder_id, encoders[name].feature_dim)
        if ref.num_classes != num_classes:
            raise ValueError(
                f"the class statistics of {name!r} have {ref.num_classes} classes, num_classes is {num_classes}.")
    if class_references and num_samples < 2 * num_classes:
        raise ValueError(
            f"per-class FD needs >= 2 samples per class: num_samples >= {2 * num_classes}, got {num_samples}.")


def _check_sample_folders(sample_folders, generators, output_dir) -> None:
    if not sample_folders:
        return
    if output_dir is None:
        raise ValueError("sample_folders writes PNGs under output_dir; pass output_dir too.")
    unknown = sorted(set(sample_folders) - set(generators))
    if unknown:
        raise ValueError(f"sample_folders names {unknown}, which are not among the generators {sorted(generators)}.")
    folders = list(sample_folders.values())
    for folder in folders:
        if not isinstance(folder, str) or not folder or Path(folder).name != folder or folder in (".", ".."):
            raise ValueError(f"sample folder names must be plain folder names (no path separators), got {folder!r}.")
    if len(set(folders)) != len(folders):
        raise ValueError(f"sample_folders must give every generator its own folder, got {folders}.")


def _conditioning_summary(conditioning) -> dict:
    """``{"adherence": float | None, "conditioning": {rep: {"per_class_fd", "fjd", "class_fd": {str(c): fd}}}}``
    of an ``EvaluationResult.conditioning`` (None: neither classifier nor class references)."""
    if conditioning is None:
        return {"adherence": None, "conditioning": {}}
    return {
        "adherence": conditioning.adherence,
        "conditioning": {
            rep: {"per_class_fd": r.per_class_fd, "fjd": r.fjd,
                  "class_fd": {str(c): fd for c, fd in zip(r.classes, r.class_fd)}}
            for rep, r in conditioning.representations.items()
        },
    }


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
    num_classes: Optional[int] = None,
    class_references: Optional[Mapping[str, object]] = None,
    classifier=None,
    classifier_name: Optional[str] = None,
) -> dict:
    """FD of every generator in every representation, repeated over ``seeds``: mean and standard deviation.

    Each seed is one :func:`compare_generators` run (its FD samples come from ``seed + 1``), so the spread is
    the sampling noise of an N-sample FD of that generator (the model is fixed). ``known_reports`` are
    :func:`compare_generators` reports already made with the same generators, encoders and ``num_samples``
    (and the same ``num_classes``, class references and, if given, a classifier); a seed that one of them
    covers is taken from it instead of being measured again.

    Class-conditional generators (``num_classes``, ``class_references``, ``classifier`` as in
    :func:`compare_generators`; the classifier only gives adherence here, no class histogram): the spread of
    adherence, per-class FD and FJD too.

    Returns (also ``seed_spread.json``; ``seed_spread.md`` is the table)::

        {"num_samples": int, "seeds": [int], "representations": {rep: {"held_out": bool}},
         "generators": {name: {rep: {"mean": float, "std": float (n - 1), "values": [float per seed]}}}}

    With ``num_classes`` also ``"num_classes"``, ``"conditioning_representations": [rep]`` and
    ``"conditioning": {name: {"adherence": stat | None, "per_class_fd": {rep: stat}, "fjd": {rep: stat}}}``,
    each stat ``{"mean", "std", "values"}`` like the FDs.
    """
    seeds = [int(x) for x in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seed_spread needs at least two distinct seeds, got {seeds}.")
    held_out = set(held_out)
    class_references = dict(class_references or {})
    predict = _label_predictor(classifier) if num_classes is not None else classifier

    def matches(r):
        same = (r["num_samples"] == num_samples and set(r["generators"]) == set(generators)
                and set(r["representations"]) == set(encoders) and r.get("num_classes") == num_classes)
        if same and num_classes is not None:
            same = set(r["conditioning_representations"]) == set(class_references) and (
                predict is None or all(g["adherence"] is not None for g in r["generators"].values()))
        return same

    known = {r["seed"]: r for r in known_reports if matches(r)}
    conditioning = dict(num_classes=num_classes, class_references=class_references, classifier=predict,
                        classifier_name=classifier_name) if num_classes is not None else {}
    runs = [
        known.get(seed) or compare_generators(generators, encoders, references, num_samples=num_samples,
                                              held_out=held_out, grid_samples=0, batch_size=batch_size, seed=seed,
                                              **conditioning)
        for seed in seeds
    ]
    spread = {gname: {rep: _spread([run["generators"][gname]["fd"][rep] for run in runs]) for rep in encoders}
              for gname in generators}
    report = {
        "num_samples": num_samples,
        "seeds": seeds,
        "representations": {rep: {"held_out": rep in held_out} for rep in encoders},
        "generators": spread,
    }
    if num_classes is not None:
        cond_reps = [rep for rep in encoders if rep in class_references]
        report["num_classes"] = int(num_classes)
        report["conditioning_representations"] = cond_reps
        report["conditioning"] = {
            gname: {
                "adherence": None if predict is None else _spread(
                    [run["generators"][gname]["adherence"] for run in runs]),
                **{measure: {rep: _spread([run["generators"][gname]["conditioning"][rep][measure] for run in runs])
                             for rep in cond_reps}
                   for measure in ("per_class_fd", "fjd")},
            }
            for gname in generators
        }
    if output_dir is not None:
        write_report(report, output_dir, format_seed_spread_table(report), SPREAD_TABLE_FILENAME, SPREAD_JSON_FILENAME)
    return report


def _spread(values) -> dict:
    """``{"mean", "std" (unbiased, n - 1), "values"}`` of per-seed numbers (float64)."""
    values = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "values": values.tolist()}
