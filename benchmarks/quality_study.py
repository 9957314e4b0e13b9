#!/usr/bin/env python
# Copyright 2025 The fd-onestep authors. Licensed under the Apache License, Version 2.0.
"""Quality study: the one-step student's held-out FD as training goes on, against its teacher's multi-step sampler.

    # measure training runs already made (one output dir per training seed, same demo and settings)
    python benchmarks/quality_study.py --runs runs/s0 runs/s1 runs/s2 --name digits

    # or launch them first (one after the other), then measure: a later invocation resumes unfinished runs
    python benchmarks/quality_study.py --launch --runs_root runs/quality --seeds 0 1 2 --name digits-quality \\
        -- --embedded_default digits --preset quality

Every run is an output dir of ``train_scripts/train_fd_onestep.py`` with its checkpoints. For each checkpoint
(and for the run's own output, the weights it kept) the student is loaded -- the generator-EMA weights where
the run kept an EMA (``--use_ema``), as the run validates and saves them -- and measured with
:func:`fd_onestep.comparison.compare_generators` in the run's training and held-out representations, with the
same noise, labels (and prompts) as the teacher's multi-step samplers (``--teacher_steps``, 20 and 50 by default),
which are measured once. Class- and text-conditional runs also get per-class FD (mean over classes) and
adherence (the run's ``--classifier``).

Held-out representations only judge. Nothing here chooses a run, a checkpoint or a setting: the weights a run
kept were chosen by the run itself (``--keep_best_by``, on the fresh-sample FD of its *training* encoders), and
the study records which. Every checkpoint is reported, so a curve shows what a longer or shorter schedule gives.

    # one picture of several studies (their records), one row each
    python benchmarks/quality_study.py --overview digits=results/quality_study/digits-quality.json \\
        class=results/quality_study/digits-class-quality.json --name overview

Writes ``<name>.md`` (the table), ``<name>.json`` (every number, per run) and ``<name>.png`` (one panel per
held-out measure: the student's mean over training seeds with its min-max band, each seed thin, the teacher's
samplers as horizontal lines) into ``--output_dir`` (default: ``results/quality_study/`` where the repository
has a ``results/`` folder, else ``benchmarks/results/quality_study/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "train_scripts" / "train_fd_onestep.py"
TEACHER = "teacher, {sampler} {steps} steps"
STUDENT = "student, 1 step (FD-loss)"
KEPT = "kept"  # the step key of a run's own output (the weights it kept)

__all__ = ["measure_runs", "format_table", "plot_study", "plot_overview", "lever_table", "format_lever_table",
           "launch_runs", "main"]


def default_output_dir() -> Path:
    results = REPO / "results"
    return (results if results.is_dir() else REPO / "benchmarks" / "results") / "quality_study"


def load_script():
    """The training script as a module: the study builds the encoders, statistics and classifier exactly as the
    run did (its ``build_representations``), from the run's saved arguments."""
    spec = importlib.util.spec_from_file_location("train_fd_onestep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------------
# Runs: their arguments, checkpoints, students
def run_args(run_dir: Path) -> Namespace:
    """The run's arguments as the training script saved them (``fd_onestep_run_args.json``)."""
    from fd_onestep.training.run_args import RUN_ARGS_FILE

    path = Path(run_dir) / RUN_ARGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {RUN_ARGS_FILE}: pass output dirs of train_fd_onestep.py "
                                "(or --launch the runs).")
    return Namespace(**json.loads(path.read_text())["args"])


def check_same_study(runs: list[Path], argsets: list[Namespace]) -> None:
    """All runs must be the same recipe up to the training seed (and the output / bookkeeping arguments)."""
    from fd_onestep.training.run_args import NON_FINGERPRINT_ARGS

    ignore = set(NON_FINGERPRINT_ARGS) | {"seed"}
    first = {k: v for k, v in vars(argsets[0]).items() if k not in ignore}
    for run, args in zip(runs[1:], argsets[1:]):
        other = {k: v for k, v in vars(args).items() if k not in ignore}
        diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if diff:
            raise ValueError(f"{run} differs from {runs[0]} in {diff}: a study compares training seeds of one "
                             "recipe; measure other settings in their own study.")


def checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    from fd_onestep.training.checkpoints import checkpoint_step, list_checkpoints

    return {checkpoint_step(path): path for path in list_checkpoints(run_dir)}


def kept_weights(run_dir: Path, args: Namespace) -> dict:
    """Which weights the run left in its output dir, and what chose them (the run's own rule, never the study)."""
    summary_path = Path(run_dir) / "fd_onestep_summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no fd_onestep_summary.json: the run has not finished (resume it "
                                "with --resume_from_checkpoint latest).")
    final = json.loads(summary_path.read_text()).get("final_weights") or {}
    chosen_by = ("the last step" if final.get("which") != "best" else
                 f"--keep_best_by {args.keep_best_by}: the lowest fresh-sample FD of the training representations "
                 f"({args.num_validation_samples} fresh samples per validation, every {args.validation_steps} steps)")
    return {"step": final.get("step"), "which": final.get("which"), "chosen_by": chosen_by}


def load_student(run_dir: Path, checkpoint: Path | None, args: Namespace, device):
    """The run's student: its output pipeline (``checkpoint`` None), or the weights of ``checkpoint`` in the same
    pipeline; a checkpoint's generator EMA (``--use_ema``) replaces the raw weights, as the run's validation does."""
    from fd_onestep.evaluation import load_pipeline
    from fd_onestep.training.state import load_state_file

    if checkpoint is None:
        pipe = load_pipeline(run_dir, local_files_only=True)
    elif args.use_lora:  # the checkpoint's <denoiser>_lora folder on the run's base model and settings
        folders = sorted(Path(checkpoint).glob("*_lora"))
        if len(folders) != 1:
            raise FileNotFoundError(f"{checkpoint} has no <denoiser>_lora folder: not a LoRA run's checkpoint.")
        pipe = load_pipeline(run_dir, local_files_only=True, lora_weights=folders[0])
    else:
        pipe = load_pipeline(run_dir, local_files_only=True)
        denoiser = pipe.denoiser
        saved = type(denoiser).from_pretrained(Path(checkpoint) / pipe.denoiser_slot)
        denoiser.load_state_dict(saved.state_dict())
    if checkpoint is not None and (Path(checkpoint) / "generator_ema.safetensors").is_file():
        shadow = load_state_file(Path(checkpoint) / "generator_ema.safetensors")["shadow_params"]
        params = [p for n, p in pipe.denoiser.named_parameters() if not args.use_lora or "lora_" in n]
        if len(params) != len(shadow) or any(p.shape != s.shape for p, s in zip(params, shadow)):
            raise ValueError(f"{checkpoint}: its generator EMA has {len(shadow)} tensors, the student's trainable "
                             f"weights {len(params)} (of other shapes): not this run's checkpoint.")
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s.to(p.dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def conditioning_kind(args: Namespace, pipe) -> str:
    if pipe.is_text_conditional:
        if args.embedded_default != "digits-text":
            raise ValueError("the quality study measures text-to-image runs of the digits-text demo only (its prompts "
                             "name the digit); measure other text models with `fd-onestep evaluate`.")
        return "text"
    return "class" if pipe.is_class_conditional else "unconditional"


def student_generator(pipe, kind: str):
    from fd_onestep.comparison.generators import one_step_pipeline, prompted_pipeline

    if kind != "text":
        return one_step_pipeline(pipe)
    from fd_onestep.demos import digits

    return prompted_pipeline(pipe, lambda labels, g: digits.digit_prompts(labels, digits.TRAINING_PHRASINGS, g),
                             description="1 step")


def teacher_generators(args: Namespace, kind: str, steps: list[int], sampler: str, device) -> dict:
    """The teacher's multi-step samplers, one per entry of ``steps``, as comparison generators."""
    from fd_onestep.comparison.generators import teacher_sampler

    if kind == "text":
        from fd_onestep.demos import digits
        from fd_onestep.demos.digits.baselines import digits_text_generators, load_digits_text_teachers

        teachers = load_digits_text_teachers(sampler=sampler, device=device)
        out = {}
        for n in steps:
            gens = digits_text_generators(digits.TRAINING_PHRASINGS, sampler=sampler, num_inference_steps=n,
                                          teachers=teachers)
            out[TEACHER.format(sampler=sampler, steps=n)] = gens[TEACHER.format(sampler=sampler, steps=n)]
        return out
    from diffusers import DiffusionPipeline

    teacher = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, local_files_only=True).to(device)
    teacher.set_progress_bar_config(disable=True)
    return {TEACHER.format(sampler=sampler, steps=n): teacher_sampler(teacher, n, sampler,
                                                                      null_class_label=args.null_class_label)
            for n in steps}


# --------------------------------------------------------------------------------------------------------
# Measuring
def _measures(report: dict, name: str, conditional: bool) -> dict:
    """``{"fd": {rep}, "per_class_fd": {rep}, "adherence": float | None}`` of one generator in a comparison."""
    g = report["generators"][name]
    out = {"fd": dict(g["fd"])}
    if conditional:
        out["per_class_fd"] = {rep: r["per_class_fd"] for rep, r in (g.get("conditioning") or {}).items()}
        out["adherence"] = g.get("adherence")
    return out


def measure_runs(runs: list[Path], *, num_samples: int = 1000, teacher_steps=(20, 50), sampler: str = "dpmsolver++",
                 seed: int = 0, batch_size: int = 250, device=None, log=print) -> dict:
    """Measure every checkpoint of every run, and the teacher's samplers once (see the module docstring).

    Returns the study record::

        {"runs": [{"dir", "seed", "kept": {"step", "which", "chosen_by"}, "steps": {str(step) | "kept": measures}}],
         "teacher": {name: measures}, "representations": {rep: {"held_out": bool}}, "conditioning": str,
         "num_samples", "seed", "chosen_on": str, ...}

    ``measures`` is ``{"fd": {rep: float}}``, conditional runs adding ``"per_class_fd": {rep: float}`` and
    ``"adherence": float | None``.
    """
    from fd_onestep.comparison import compare_generators

    if not runs:
        raise ValueError("no runs to measure: pass --runs DIR [DIR ...] (or --launch).")
    runs = [Path(r) for r in runs]
    argsets = [run_args(r) for r in runs]
    check_same_study(runs, argsets)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    script = load_script()
    args0 = argsets[0]
    reps = script.build_representations(args0, device)
    encoders, references = reps.all_encoders, reps.all_references
    held_out = set(reps.eval_encoders)
    if not held_out:
        raise ValueError(f"{runs[0]} has no held-out representations (--eval_encoders): the study judges in "
                         "representations the loss never saw; rerun with --eval_encoders / --eval_reference_stats.")
    probe = load_student(runs[0], None, args0, device)
    kind = conditioning_kind(args0, probe)
    conditional = kind != "unconditional"
    compare_kwargs = dict(num_samples=num_samples, held_out=held_out, grid_samples=0, batch_size=batch_size, seed=seed)
    if conditional:
        class_refs = {n: r for n, r in reps.class_references.items() if n in encoders}
        num_classes = next(iter(class_refs.values())).num_classes if class_refs else probe.num_classes
        compare_kwargs.update(num_classes=num_classes, class_references=class_refs,
                              classifier=reps.classifier_model, classifier_name=args0.classifier)
    del probe

    log(f"teacher: {sampler} {list(teacher_steps)} steps, {num_samples} samples")
    teachers = teacher_generators(args0, kind, list(teacher_steps), sampler, device)
    start = time.time()
    report = compare_generators(teachers, encoders, references, **compare_kwargs)
    teacher = {name: {**_measures(report, name, conditional), "seconds": report["generators"][name]["seconds"]}
               for name in teachers}
    log(f"  {time.time() - start:.0f} s")

    records = []
    for run, args in zip(runs, argsets):
        kept = kept_weights(run, args)
        steps = {}
        for step, ckpt in [*sorted(checkpoint_steps(run).items()), (KEPT, None)]:
            pipe = load_student(run, ckpt, args, device)
            report = compare_generators({STUDENT: student_generator(pipe, kind)}, encoders, references,
                                        **compare_kwargs)
            steps[str(step)] = _measures(report, STUDENT, conditional)
            log(f"{run} step {step}: " + ", ".join(f"{rep} {fd:.4g}" for rep, fd in steps[str(step)]["fd"].items()))
            del pipe
        records.append({"dir": str(run), "seed": args.seed, "kept": kept, "steps": steps})

    return {
        "conditioning": kind,
        "num_samples": num_samples,
        "seed": seed,
        "sampler": sampler,
        "teacher_steps": list(teacher_steps),
        "representations": {rep: {"held_out": rep in held_out} for rep in encoders},
        "chosen_on": f"the kept weights: {records[0]['kept']['chosen_by']} (the run's own rule); the held-out "
                     "representations chose nothing",
        "recipe": {k: v for k, v in vars(args0).items() if k not in ("output_dir", "seed", "hub_token")},
        "teacher": teacher,
        "runs": records,
    }


# --------------------------------------------------------------------------------------------------------
# Table and plot
def _stat(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0,
            "min": float(t.min()), "max": float(t.max()), "n": len(values)}


def measure_columns(study: dict) -> list[tuple[str, str | None, bool]]:
    """``(measure, rep or None, held_out)`` of every column: FD per representation (held-out first), then
    per-class FD per representation and adherence for conditional studies."""
    reps = sorted(study["representations"], key=lambda r: not study["representations"][r]["held_out"])
    cols = [("fd", rep, study["representations"][rep]["held_out"]) for rep in reps]
    if study["conditioning"] != "unconditional":
        first = next(iter(study["teacher"].values()))
        cols += [("per_class_fd", rep, study["representations"][rep]["held_out"]) for rep in reps
                 if rep in first.get("per_class_fd", {})]
        cols.append(("adherence", None, True))
    return cols


def _value(measures: dict, measure: str, rep: str | None):
    return measures.get(measure) if rep is None else (measures.get(measure) or {}).get(rep)


def step_rows(study: dict) -> list[str]:
    """The step keys measured in every run, in order (numbers ascending, then the kept weights)."""
    common = set.intersection(*(set(r["steps"]) for r in study["runs"]))
    return sorted((s for s in common if s != KEPT), key=int) + ([KEPT] if KEPT in common else [])


def summarize(study: dict) -> dict:
    """Per step and column: mean / std / min / max over the training seeds; ``study["summary"]``."""
    cols = measure_columns(study)
    out = {}
    for step in step_rows(study):
        out[step] = {f"{m}/{rep}" if rep else m: _stat([_value(r["steps"][step], m, rep) for r in study["runs"]])
                     for m, rep, _ in cols}
    return out


def format_table(study: dict) -> str:
    """The markdown table: teacher rows, then the student per step (mean ± std over training seeds) and the ratio
    of the mean to the teacher's first sampler in every held-out FD."""
    cols = measure_columns(study)
    summary = summarize(study)
    base_name = next(iter(study["teacher"]))
    base = study["teacher"][base_name]
    names = {"fd": "FD", "per_class_fd": "per-class FD", "adherence": "adherence"}
    header = [f"{names[m]} {rep or ''}{' (held out)' if held and rep else ' (training)' if rep else ''}".strip()
              for m, rep, held in cols]
    lines = [
        f"Quality study: {study['conditioning']} runs, {len(study['runs'])} training seeds "
        f"({', '.join(str(r['seed']) for r in study['runs'])}), {study['num_samples']} samples per measurement "
        f"(comparison seed {study['seed']}).",
        "",
        f"Chosen on: {study['chosen_on']}.",
        "",
        "| generator | step | " + " | ".join(header) + " |",
        "|---|---|" + "---|" * len(header),
    ]

    def fmt(v, m):
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" if m == "adherence" else f"{v:.4g}"

    for name, measures in study["teacher"].items():
        lines.append(f"| {name} | - | " + " | ".join(fmt(_value(measures, m, rep), m) for m, rep, _ in cols) + " |")
    kept_steps = sorted({str(r["kept"]["step"]) for r in study["runs"]})
    for step in step_rows(study):
        cells = []
        for m, rep, held in cols:
            s = summary[step][f"{m}/{rep}" if rep else m]
            cell = "-" if s["mean"] is None else (
                f"{fmt(s['mean'], m)} ± {fmt(s['std'], m)}" if s["n"] > 1 else fmt(s["mean"], m))
            ref = _value(base, m, rep)
            if held and m != "adherence" and s["mean"] is not None and ref:
                cell += f" ({s['mean'] / ref:.2f}x)"
            cells.append(cell)
        label = f"kept (step {', '.join(kept_steps)})" if step == KEPT else step
        lines.append(f"| {STUDENT} | {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Ratios: the student's mean over training seeds / {base_name}, held-out measures only "
                  "(lower is better for FD; adherence: higher is better)."]
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("the quality study's plot needs matplotlib: `pip install matplotlib` (or pass --no_plot).")
    return plt


PANEL_TITLES = {"fd": "held-out FD", "per_class_fd": "held-out per-class FD", "adherence": "adherence"}


def _draw_panel(ax, study: dict, measure: str, rep: str | None, title: str) -> None:
    """One measure against the training step: each seed thin, the min-max band, the mean over seeds, and the
    teacher's samplers as horizontal lines."""
    steps = [s for s in step_rows(study) if s != KEPT]
    x = [int(s) for s in steps]
    for run in study["runs"]:
        ax.plot(x, [_value(run["steps"][s], measure, rep) for s in steps], color="tab:blue", alpha=0.3, lw=0.8)
    stats = [_stat([_value(r["steps"][s], measure, rep) for r in study["runs"]]) for s in steps]
    ax.fill_between(x, [st["min"] for st in stats], [st["max"] for st in stats], color="tab:blue", alpha=0.15, lw=0)
    ax.plot(x, [st["mean"] for st in stats], color="tab:blue", marker="o", ms=3,
            label=f"student, mean of {len(study['runs'])} seeds")
    for (name, measures), style in zip(study["teacher"].items(), ("--", ":", "-.")):
        value = _value(measures, measure, rep)
        if value is not None:
            ax.axhline(value, color="tab:red", ls=style, lw=1.2, label=name)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)


def plot_study(study: dict, path: Path) -> Path:
    """One panel per held-out measure: the student's mean over seeds (line), min-max band, each seed (thin), and
    the teacher's samplers (horizontal lines). Needs matplotlib (``pip install matplotlib``)."""
    plt = _pyplot()
    cols = [c for c in measure_columns(study) if c[2]]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.4), squeeze=False)
    for ax, (m, rep, _) in zip(axes[0], cols):
        _draw_panel(ax, study, m, rep, f"{PANEL_TITLES[m]}{' ' + rep if rep else ''}")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def headline_columns(study: dict) -> list[tuple[str, str | None]]:
    """The measures the issue's claim is about: held-out FD for an unconditional study; held-out per-class FD and
    adherence for a conditional one (marginal FD is blind to the condition); a measure no run has (adherence
    without a classifier) is left out."""
    cols = [(m, rep) for m, rep, held in measure_columns(study) if held]
    if study["conditioning"] != "unconditional":
        cols = [(m, rep) for m, rep in cols if m != "fd"]
    return [(m, rep) for m, rep in cols
            if any(_value(r["steps"][s], m, rep) is not None for r in study["runs"] for s in step_rows(study))]


def plot_overview(studies: dict[str, dict], path: Path) -> Path:
    """One row per study (``{label: study}``), its headline measures (:func:`headline_columns`) as panels: the
    picture of several demos' studies side by side."""
    plt = _pyplot()
    rows = {label: headline_columns(study) for label, study in studies.items()}
    width = max(len(cols) for cols in rows.values())
    fig, axes = plt.subplots(len(rows), width, figsize=(3.6 * width, 2.9 * len(rows)), squeeze=False)
    for r, (label, cols) in enumerate(rows.items()):
        for c in range(width):
            ax = axes[r][c]
            if c >= len(cols):
                ax.axis("off")
                continue
            m, rep = cols[c]
            _draw_panel(ax, studies[label], m, rep, f"{label}: {PANEL_TITLES[m].replace('held-out ', '')}"
                                                    f"{' ' + rep if rep else ''}")
        axes[r][0].legend(fontsize=6)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_study(study: dict, output_dir: Path, name: str, plot: bool = True) -> dict:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {**study, "summary": summarize(study)}
    files = {"table": output_dir / f"{name}.md", "record": output_dir / f"{name}.json"}
    files["table"].write_text(format_table(study))
    files["record"].write_text(json.dumps(record, indent=2, default=str))
    if plot:
        files["plot"] = plot_study(study, output_dir / f"{name}.png")
    return files


# --------------------------------------------------------------------------------------------------------
# Levers: one run per setting, each read from its own comparison
def lever_table(levers: dict[str, Path]) -> dict:
    """One row per run (``{label: output dir}``, the first the baseline), read from what each run wrote itself:
    its comparison (``comparison.json``: the student's and the teacher's 20-step sampler's FD with the same noise,
    in the held-out representations; per-class FD and adherence for a conditional run), the training
    representations' measure that chose its kept weights (``fd_onestep_best.json``) and its training time
    (``fd_onestep_summary.json``). Nothing here measures anew: the table is what the runs reported."""
    rows = {}
    for label, run in levers.items():
        run = Path(run)
        missing = [f for f in ("comparison.json", "fd_onestep_summary.json") if not (run / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{run} has no {' / '.join(missing)}: a lever run must finish with its "
                                    "comparison (--compare_with_teacher, the digits recipes' default).")
        comparison = json.loads((run / "comparison.json").read_text())
        teacher = next((k for k in comparison["generators"] if k.startswith("teacher, ") and "naive" not in k), None)
        if teacher is None or STUDENT not in comparison["generators"]:
            raise ValueError(f"{run}/comparison.json has no multi-step teacher row beside the student.")
        conditional = bool(comparison["generators"][STUDENT].get("conditioning"))
        st, te = (_measures(comparison, name, conditional) for name in (STUDENT, teacher))
        held_out = [r for r, info in comparison["representations"].items() if info["held_out"]]
        measures = {f"{m}/{r}": (st[m][r], te[m][r]) for m in ("fd", "per_class_fd") if m in st for r in held_out}
        if conditional:
            measures["adherence"] = (st["adherence"], te["adherence"])
        best = run / "fd_onestep_best.json"
        best = json.loads(best.read_text()) if best.is_file() else {}
        summary = json.loads((run / "fd_onestep_summary.json").read_text())
        rows[label] = {"run": str(run), "teacher": teacher, "measures": measures,
                       "kept_step": (summary.get("final_weights") or {}).get("step"),
                       "chosen_by": best.get("keep_best_by"), "training_measure": best.get("metric"),
                       "train_seconds": summary.get("train_seconds"), "steps": summary.get("global_step")}
    baseline = next(iter(levers))
    for label, row in rows.items():
        if set(row["measures"]) != set(rows[baseline]["measures"]):
            raise ValueError(f"{row['run']} measured {sorted(row['measures'])}, the baseline "
                             f"{rows[baseline]['run']} {sorted(rows[baseline]['measures'])}: levers of one demo "
                             "go in one table.")
    return {"rows": rows, "baseline": baseline}


def format_lever_table(table: dict) -> str:
    """Markdown: per run its held-out measures as ratios to its own teacher row (and the values), the training
    representations' measure of its kept weights, and its training time against the baseline's."""
    rows = table["rows"]
    base = rows[table["baseline"]]
    keys = list(base["measures"])
    names = {"fd": "FD", "per_class_fd": "per-class FD"}

    def head(key):
        m, _, rep = key.partition("/")
        return f"{names[m]} {rep} / teacher" if rep else "adherence (teacher)"

    lines = ["| lever | " + " | ".join(head(k) for k in keys) + " | training representations, kept weights | "
             "training time |", "|---|" + "---:|" * len(keys) + "---|---:|"]
    for label, row in rows.items():
        cells = []
        for key in keys:
            student, teacher = row["measures"][key]
            cells.append(f"{100 * student:.1f}% ({100 * teacher:.1f}%)" if key == "adherence" else
                         f"{student / teacher:.2f} ({student:.4g})")
        train = "-" if row["training_measure"] is None else \
            f"{row['chosen_by']} {row['training_measure']:.3f} (step {row['kept_step']})"
        time_cell = f"{row['train_seconds']:.0f} s ({row['train_seconds'] / base['train_seconds']:.2f}x)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {train} | {time_cell} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Launching the runs
def launch_runs(runs_root: Path, seeds: list[int], train_args: list[str], *, num_processes: int = 1,
                log=print) -> list[Path]:
    """One training run per seed, ``runs_root/seed<k>``, with ``train_args`` (the same for all); a finished run
    is left as is, an unfinished one resumed (``--resume_from_checkpoint latest``)."""
    if any(a == "--seed" or a.startswith("--seed=") or a == "--output_dir" or a.startswith("--output_dir=")
           for a in train_args):
        raise ValueError("the study sets --seed and --output_dir of every run itself: drop them from the training "
                         "arguments.")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
                "--num_machines", "1", "--dynamo_backend", "no"] + (["--multi_gpu"] if num_processes > 1 else [])
    dirs = []
    for seed in seeds:
        out = Path(runs_root) / f"seed{seed}"
        dirs.append(out)
        if (out / "fd_onestep_summary.json").is_file():
            log(f"{out}: finished, measured as is")
            continue
        cmd = [*launcher, str(SCRIPT), "--output_dir", str(out), "--seed", str(seed), *train_args,
               "--resume_from_checkpoint", "latest"]
        log("$ " + " ".join(cmd))
        start = time.time()
        subprocess.run(cmd, check=True, cwd=REPO)
        log(f"{out}: {time.time() - start:.0f} s")
    return dirs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", nargs="*", default=[], help="Output dirs of train_fd_onestep.py, one per training seed.")
    p.add_argument("--launch", action="store_true",
                   help="Train the runs first: one per --seeds under --runs_root, with the arguments after `--`.")
    p.add_argument("--runs_root", default=None, help="--launch: where the runs go (runs_root/seed<k>).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--launch: the training seeds.")
    p.add_argument("--num_processes", type=int, default=1, help="--launch: processes per run (accelerate launch).")
    p.add_argument("--name", default="quality_study", help="File names of the table, record and plot.")
    p.add_argument("--output_dir", default=None, help="Default: results/quality_study (benchmarks/results/... "
                                                      "where the repository has no results/ folder).")
    p.add_argument("--num_samples", type=int, default=1000, help="Samples per measurement.")
    p.add_argument("--teacher_steps", type=int, nargs="+", default=[20, 50], help="The teacher's sampler steps.")
    p.add_argument("--sampler", default="dpmsolver++", choices=["dpmsolver++", "ddim", "ddpm"])
    p.add_argument("--seed", type=int, default=0, help="Comparison seed (noise, labels, prompts of every measurement).")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--no_plot", action="store_true", help="Table and record only.")
    p.add_argument("--levers", nargs="+", default=None, metavar="LABEL=RUN",
                   help="Measure nothing: tabulate runs of one setting each (the first the baseline) from their own "
                        "comparisons into <name>.md / .json.")
    p.add_argument("--overview", nargs="+", default=None, metavar="LABEL=RECORD",
                   help="Measure nothing: draw <name>.png from studies already written (their <name>.json records), "
                        "one row per study, its headline held-out measures as panels.")
    return p


def _label_and_path(item: str, flag: str, what: str) -> tuple[str, Path]:
    label, sep, path = item.rpartition("=")
    if not sep or not label or not Path(path).exists():
        raise SystemExit(f"error: {flag} takes LABEL=PATH with {what}, got {item!r}.")
    return label, Path(path)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir()
    if args.levers:
        levers = dict(_label_and_path(item, "--levers", "RUN a training run's output dir") for item in args.levers)
        table = lever_table(levers)
        output_dir.mkdir(parents=True, exist_ok=True)
        files = {"table": output_dir / f"{args.name}.md", "record": output_dir / f"{args.name}.json"}
        files["table"].write_text(format_lever_table(table))
        files["record"].write_text(json.dumps(table, indent=2))
        print(files["table"].read_text())
        return {"table": table, "files": files}
    if args.overview:
        studies = {}
        for item in args.overview:
            label, record = _label_and_path(item, "--overview", "RECORD a study's .json record")
            studies[label] = json.loads(record.read_text())
        path = plot_overview(studies, output_dir / f"{args.name}.png")
        print(f"plot: {path}")
        return {"files": {"plot": path}}
    if args.num_samples < 2 or any(n < 1 for n in args.teacher_steps):
        raise SystemExit("error: --num_samples must be >= 2 and --teacher_steps >= 1.")
    if args.launch:
        if not args.runs_root:
            raise SystemExit("error: --launch needs --runs_root DIR (where the runs go).")
        runs = launch_runs(Path(args.runs_root), args.seeds, train_args, num_processes=args.num_processes)
        runs += [Path(r) for r in args.runs]
    else:
        if train_args:
            raise SystemExit("error: training arguments after `--` are for --launch.")
        runs = [Path(r) for r in args.runs]
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401 - checked before minutes of sampling, not after
        except ImportError:
            raise SystemExit("error: the plot needs matplotlib: `pip install matplotlib`, or pass --no_plot.")
    study = measure_runs(runs, num_samples=args.num_samples, teacher_steps=args.teacher_steps, sampler=args.sampler,
                         seed=args.seed, batch_size=args.batch_size)
    files = write_study(study, output_dir, args.name, plot=not args.no_plot)
    print(files["table"].read_text())
    print("\n".join(f"{k}: {v}" for k, v in files.items()))
    return {"study": study, "files": files}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
