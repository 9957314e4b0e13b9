"""What a comparison writes: the labelled sample grid (PNG), the markdown tables and the JSON report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional

import torch

__all__ = [
    "GRID_FILENAME",
    "TABLE_FILENAME",
    "JSON_FILENAME",
    "SPREAD_TABLE_FILENAME",
    "SPREAD_JSON_FILENAME",
    "SAMPLES_DIRNAME",
    "save_comparison_grid",
    "format_markdown_table",
    "format_seed_spread_table",
    "format_training_runs_table",
    "write_report",
]

GRID_FILENAME = "comparison_grid.png"
TABLE_FILENAME = "comparison.md"
JSON_FILENAME = "comparison.json"
SPREAD_TABLE_FILENAME = "seed_spread.md"
SPREAD_JSON_FILENAME = "seed_spread.json"
RUNS_TABLE_FILENAME = "training_runs.md"
# output_dir/comparison_samples/<generator folder>/[<label>/]<index:06d>.png
SAMPLES_DIRNAME = "comparison_samples"

CONDITIONING_DEFINITIONS = (
    "Adherence = share of the samples that the classifier (for digits: the bundled digit classifier) assigns to "
    "the class they were generated for. "
    "Per-class FD = mean over classes c of FD(samples of class c, reference of class c). "
    "FJD (Fréchet Joint Distance, DeVries et al. 2019) = FD of the joint vectors [feature, alpha * one_hot(label)], "
    "alpha the label scale stored with the class reference. Held out = never used in the training loss."
)


def save_comparison_grid(blocks: Mapping[str, torch.Tensor], path, nrow: Optional[int] = None, cell: int = 48) -> Path:
    """One labelled block per generator, side by side.

    Args:
        blocks: name -> images (n, C, H, W) in [-1, 1] (same n, C for all).
        nrow: images per block row (default ceil(sqrt(n))).
        cell: pixels per image side in the PNG (nearest-neighbour upscale: small images stay crisp).
    """
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    from ..images import tensor_to_pil

    if not blocks:
        raise ValueError("no generator samples to draw; pass at least one generator.")
    tiles = []
    for name, images in blocks.items():
        n = images.shape[0]
        per_row = nrow or max(1, math.ceil(math.sqrt(n)))
        x = torch.nn.functional.interpolate(images.detach().float().cpu(), size=(cell, cell), mode="nearest")
        # make_grid draws gray as RGB; pad value 1.0 is white in [-1, 1]
        grid = make_grid(x, nrow=per_row, padding=2, pad_value=1.0)
        tiles.append((name, tensor_to_pil(grid[None])[0]))
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


def _conditioning_header(report: dict) -> list:
    """``adherence (%) | per-class FD <rep> | FJD <rep> ...`` cells of a class-conditional report's table."""
    header = ["adherence (%)"]
    for rep in report["conditioning_representations"]:
        mark = " (held out)" if report["representations"][rep]["held_out"] else ""
        header += [f"per-class FD {rep}{mark}", f"FJD {rep}{mark}"]
    return header


def _table(header: list, rows: list) -> list:
    """Markdown table lines: first column left-aligned (names), the others right-aligned (numbers)."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"] + [
        "| " + " | ".join(row) + " |" for row in rows]


def _conditioning_lines(report: dict) -> list:
    """The "Conditioning" section of a class-conditional ``compare_generators`` report."""
    rows = []
    for gname, result in report["generators"].items():
        adherence = result.get("adherence")
        row = [gname, "–" if adherence is None else f"{100 * adherence:.1f}"]
        for rep in report["conditioning_representations"]:
            measures = result["conditioning"][rep]
            row += [_fmt(measures["per_class_fd"]), _fmt(measures["fjd"])]
        rows.append(row)
    classifier = f" (classifier: {report['classifier']})" if report.get("classifier") else ""
    return [
        "",
        f"**Conditioning.** {report['num_samples']} samples per generator, requested labels balanced over "
        f"{report['num_classes']} classes{classifier}. {CONDITIONING_DEFINITIONS}",
        "",
        *_table(["generator"] + _conditioning_header(report), rows),
    ]


def format_markdown_table(report: dict) -> str:
    """The markdown of a ``compare_generators`` report (FD table, the class histogram table, and for
    class-conditional generators the "Conditioning" table: adherence, per-class FD, FJD)."""
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
    if report.get("num_classes") is not None:
        lines += _conditioning_lines(report)
    return "\n".join(lines) + "\n"


def format_seed_spread_table(report: dict) -> str:
    """The markdown of a ``seed_spread`` report: ``mean ± std`` of FD per generator and representation."""
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
        cells = [_fmt_spread(per_rep[rep]) for rep in reps]
        lines.append("| " + " | ".join([gname] + cells) + " |")
    if report.get("num_classes") is not None:
        rows = []
        for gname, measures in report["conditioning"].items():
            adherence = measures["adherence"]
            row = [gname, "–" if adherence is None else
                   f"{100 * adherence['mean']:.1f} ± {100 * adherence['std']:.1f}"]
            for rep in report["conditioning_representations"]:
                row += [_fmt_spread(measures["per_class_fd"][rep]), _fmt_spread(measures["fjd"][rep])]
            rows.append(row)
        lines += ["", f"**Conditioning**, mean ± standard deviation over the same seeds. {CONDITIONING_DEFINITIONS}",
                  "", *_table(["generator"] + _conditioning_header(report), rows)]
    return "\n".join(lines) + "\n"


def _fmt_spread(stat: dict) -> str:
    return f"{_fmt(stat['mean'])} ± {_fmt(stat['std'])}"


def _mean_std(values, fmt=_fmt) -> str:
    """``mean ± std`` (n - 1) of the values, the value alone for one, "–" for none."""
    values = [float(v) for v in values]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt(values[0])
    t = torch.tensor(values, dtype=torch.float64)
    return f"{fmt(float(t.mean()))} ± {fmt(float(t.std()))}"


def format_training_runs_table(groups: Mapping[str, list], student: str, baseline: str) -> str:
    """Markdown: a student trained several times (one ``compare_generators`` report per training seed, in
    each group, e.g. ``{"joint FD-loss": [...], "marginal FD-loss": [...]}``) against a baseline generator of
    the same reports (e.g. the teacher's multi-step sampler), as mean ± standard deviation over the runs.

    Columns, for every held-out representation: FD, and (class-conditional reports) per-class FD, its ratio to
    the baseline's of the same report (the same seed), and FJD; adherence first. The baseline's row comes from
    the first group. Every report must hold both generators.
    """
    if not groups or not all(groups.values()):
        raise ValueError("pass at least one group with at least one comparison report.")
    for name, reports in groups.items():
        for r in reports:
            missing = {student, baseline} - set(r["generators"])
            if missing:
                raise ValueError(f"a report of group {name!r} (seed {r.get('seed')}) has no generator {sorted(missing)}.")
    first = next(iter(groups.values()))[0]
    held_out = [rep for rep, info in first["representations"].items() if info["held_out"]]
    conditional = "num_classes" in first
    cond_reps = [rep for rep in held_out if rep in first.get("conditioning_representations", [])]
    header = ["generator", "runs"] + (["adherence (%)"] if conditional else [])
    for rep in held_out:
        header.append(f"FD {rep}")
        if rep in cond_reps:
            header += [f"per-class FD {rep}", f"per-class FD {rep} / baseline", f"FJD {rep}"]

    def row(label: str, reports: list, gname: str) -> str:
        cells = [label, str(len(reports))]
        results = [r["generators"][gname] for r in reports]
        if conditional:
            cells.append(_mean_std([100 * x["adherence"] for x in results if x.get("adherence") is not None],
                                   fmt=lambda v: f"{v:.1f}"))
        for rep in held_out:
            cells.append(_mean_std([x["fd"][rep] for x in results]))
            if rep in cond_reps:
                cells.append(_mean_std([x["conditioning"][rep]["per_class_fd"] for x in results]))
                cells.append(_mean_std([x["conditioning"][rep]["per_class_fd"]
                                        / r["generators"][baseline]["conditioning"][rep]["per_class_fd"]
                                        for x, r in zip(results, reports)]))
                cells.append(_mean_std([x["conditioning"][rep]["fjd"] for x in results]))
        return "| " + " | ".join(cells) + " |"

    seeds = sorted({r["seed"] for reports in groups.values() for r in reports})
    lines = [
        f"Held-out representations, {first['num_samples']} samples per generator and run; mean ± standard "
        f"deviation over training runs (seeds {', '.join(map(str, seeds))}): the spread includes training noise. "
        f"Ratios are to the baseline ({baseline}) of the same run's comparison.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        row(baseline, next(iter(groups.values())), baseline),
    ]
    lines += [row(f"{student}, {name}", reports, student) for name, reports in groups.items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, output_dir, markdown: str, table_filename: str, json_filename: str) -> Path:
    """Write ``output_dir/table_filename`` (the markdown) and ``output_dir/json_filename`` (``report``, indent 1).

    Creates ``output_dir`` if missing; returns it as a Path.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / table_filename).write_text(markdown)
    (output_dir / json_filename).write_text(json.dumps(report, indent=1) + "\n")
    return output_dir
