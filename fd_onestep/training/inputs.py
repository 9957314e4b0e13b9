"""The run's inputs besides the encoders: the teacher's loading keywords, training prompts (a file or a caption
dataset), the class-label histogram, and the conditioning checks against the loaded teacher."""

from __future__ import annotations

import json
from pathlib import Path

from fd_onestep.training.representations import Representations, demo_of


def read_prompts_file(path: str | Path, flag: str = "--prompts_file") -> list[str]:
    """The non-empty lines of a UTF-8 prompts file, stripped. A file in another encoding is a ValueError naming
    the file, the line and the fix (numpy / Python's own message names neither)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{flag} {str(path)!r} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save it as "
            f"UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > prompts.utf8.txt`."
        ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def teacher_load_kwargs(args) -> dict:
    """``from_pretrained`` keywords of the teacher: revision, variant, cache dir, local-files-only."""
    kwargs = {k: getattr(args, k) for k in ("revision", "variant", "cache_dir") if getattr(args, k) is not None}
    if args.local_files_only:
        kwargs["local_files_only"] = True
    return kwargs


# Inputs: prompts, class histogram, reference statistics
def load_prompts(args) -> list[str] | None:
    if args.prompts_file is not None:
        prompts = read_prompts_file(args.prompts_file)
        if not prompts:
            raise ValueError(f"--prompts_file {args.prompts_file!r} has no prompts; write one prompt per line.")
        return prompts[: args.max_prompts] if args.max_prompts else prompts
    if args.dataset_name is not None:
        dataset = load_caption_dataset(args)
        if args.caption_column not in dataset.column_names:
            raise ValueError(
                f"--caption_column {args.caption_column!r} is not a column of {args.dataset_name} "
                f"({dataset.column_names}); pass the caption column's name."
            )
        if args.max_prompts:
            dataset = dataset.select(range(min(args.max_prompts, len(dataset))))
        prompts = []
        for caption in dataset[args.caption_column]:
            if isinstance(caption, (list, tuple)):
                prompts.extend(str(c) for c in caption if str(c).strip())
            elif caption is not None and str(caption).strip():
                prompts.append(str(caption))
        if not prompts:
            raise ValueError(f"no captions in column {args.caption_column!r} of {args.dataset_name}.")
        return prompts
    return None


def load_caption_dataset(args):
    """``--dataset_name``'s split (``datasets.load_dataset``; cached after the first call)."""
    import datasets

    return datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split,
                                 cache_dir=args.cache_dir)


def load_class_histogram(args, references) -> list[float] | None:
    if args.class_label_distribution == "uniform":
        return None
    if args.class_histogram is not None:
        hist = json.loads(Path(args.class_histogram).read_text())
        if isinstance(hist, dict):
            hist = hist.get("counts", hist.get("class_histogram"))
        return [float(h) for h in hist]
    for ref in references.values():
        raw = (ref.metadata or {}).get("class_histogram")
        if raw:
            return [float(h) for h in (json.loads(raw) if isinstance(raw, str) else raw)]
    raise ValueError(
        "--class_label_distribution reference: no label histogram found (none of the reference stats has "
        "'class_histogram' metadata); pass --class_histogram FILE (JSON list of per-class counts) or use uniform."
    )


def load_conditioning(args, pipe, reps: Representations):
    """Training prompts (text models) with the class each names where known (the digits-text default), and the
    class-label histogram (class-conditional models), checked. Returns ``(prompts, prompt_labels, histogram)``."""
    prompts = prompt_labels = None
    demo = demo_of(args)
    demo_prompts = demo.training_prompts() if demo is not None else None
    if demo_prompts is not None:  # a demo's prompts, each with the class it names
        prompts, prompt_labels = demo_prompts
    elif pipe.is_text_conditional:
        prompts = load_prompts(args)
    labeled = pipe.is_class_conditional or prompt_labels is not None
    if pipe.is_text_conditional and prompts is None:
        raise ValueError(
            f"{args.pretrained_model_name_or_path} is a text-to-image model ({pipe.family}): pass training prompts "
            "with --prompts_file FILE or --dataset_name NAME --caption_column COLUMN."
        )
    if not pipe.is_text_conditional and (args.prompts_file or args.dataset_name):
        raise ValueError(f"{args.pretrained_model_name_or_path} is not a text model: drop --prompts_file/--dataset_name.")
    class_histogram = load_class_histogram(args, reps.references) if pipe.is_class_conditional else None
    if not pipe.is_class_conditional and args.class_label_distribution != "uniform":
        raise ValueError("--class_label_distribution reference needs a class-conditional model.")
    if not labeled and (args.fd_condition == "joint" or args.classifier):
        raise ValueError(f"{args.pretrained_model_name_or_path} is not class-conditional: --fd_condition joint and "
                         "--classifier measure class labels; drop them.")
    if args.compare_with_teacher and pipe.is_latent and not getattr(demo, "compares_latent", False):
        raise ValueError(
            f"--compare_with_teacher supports pixel (UNet2DModel) teachers, unconditional or class-conditional; this "
            f"is a {pipe.family!r} model. Drop --compare_with_teacher (or pass --no-compare_with_teacher) and "
            "evaluate with `fd-onestep evaluate`."
        )
    from fd_onestep.onestep import num_label_classes

    num_classes = num_label_classes(pipe, prompt_labels)
    if labeled:
        for name, class_ref in reps.class_references.items():
            if class_ref.num_classes != num_classes:
                raise ValueError(
                    f"the per-class stats of {name} have {class_ref.num_classes} classes, the model {num_classes}"
                    + (" (its null class excluded)" if pipe.config.null_class_label is not None else "")
                    + "; pass statistics of the model's label set (and --null_class_label if it has a null class)."
                )
    return prompts, prompt_labels, class_histogram
