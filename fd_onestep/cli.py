"""``fd-onestep``: reference statistics and FD_r^k evaluation from the command line.

    fd-onestep stats     --encoders inception dinov2 --dataset <hub id or folder> --output_dir stats/
    fd-onestep stats     ... --label_column label     (also <encoder>.classes.safetensors: per-class FD, FJD)
    fd-onestep evaluate  --pipeline <dir or hub id> | --images <folder>  --encoders ... --reference_stats ...
    fd-onestep evaluate  --pipeline ... --num_classes C --class_stats ... --classifier FOLDER   (adherence, per-class FD, FJD)
    fd-onestep evaluate  --pipeline RUN --dataset D --caption_column C --num_samples N --clip_model M --teacher_steps K
    fd-onestep import-npz ref.npz --output_dir stats/ --encoder_id inception   (or: --encoders inception dinov2)
    fd-onestep export-npz stats/inception.safetensors inception.npz
    fd-onestep plan      --pretrained_model_name_or_path sdxl --train_batch_size 8 --use_lora --encoders inception dinov2 ...
    fd-onestep plan      --list      (the bundled real configs, one name a line)
    fd-onestep demo      <run dir, LoRA dir or hub id> [--with_teacher]   (a Gradio page; pip install 'fd-onestep[demo]')

``stats`` and ``evaluate`` run under ``accelerate launch`` with several processes (each process
takes a shard; moments are summed at the end). Without a GPU, accelerate's CPU processes use gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from .errors import EXPECTED_ERRORS, run_reporting_errors


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_encoder_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("encoders")
    group.add_argument(
        "--encoders", nargs="+", required=required, metavar="NAME",
        help="Encoders: inception, dinov2, siglip, clip, 'dinov2:<model>', a transformers vision model hub id "
        "or a local model folder (optionally '<id>@cls|mean|pooler').",
    )
    group.add_argument("--inception_weights", default=None, help="Local FID Inception weights file (pt_inception-2015-12-05-6726825d.pth).")
    group.add_argument("--cache_dir", default=None, help="Hugging Face cache directory for models (and datasets).")
    group.add_argument("--local_files_only", action="store_true", help="Never download weights; use local folders and caches.")
    group.add_argument("--encoder_dtype", default=None, choices=["fp32", "fp16", "bf16"], help="Weights dtype of the encoders.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fd-onestep",
        description="Reference statistics and multi-representation FD evaluation (FD, FDr, FD_r^k).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `fd-onestep <command> --help` for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{stats,evaluate,import-npz,export-npz,plan,demo}")

    stats = sub.add_parser(
        "stats", help="Compute reference statistics of a real image dataset for one or several encoders.",
        description="Compute reference statistics (mean, covariance; float64) of a dataset in one pass for every "
        "encoder and save them as <output_dir>/<encoder>.safetensors. Multi-process: "
        "`accelerate launch --multi_gpu --num_processes N -m fd_onestep.cli stats ...`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_encoder_args(stats)
    source = stats.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="🤗 dataset hub id or local dataset folder (e.g. an imagefolder layout).")
    source.add_argument("--images_dir", help="Plain folder of image files (read recursively, sorted).")
    stats.add_argument("--split", default="train", help="Dataset split for the reference statistics.")
    stats.add_argument("--image_column", default=None, help="Image column (default: the first Image feature).")
    stats.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it first.")
    stats.add_argument("--validation_split", default=None, help="Held-out split whose FD to the reference is stored as validation_fd (FD_r).")
    stats.add_argument("--validation_images_dir", default=None, help="Held-out image folder (with --images_dir) for validation_fd.")
    stats.add_argument("--max_samples", type=_positive_int, default=None, help="Use only the first N images.")
    stats.add_argument("--batch_size", type=_positive_int, default=64, help="Images per encoder call, per process.")
    stats.add_argument("--resolution", type=_positive_int, default=None,
                       help="Center-crop-resize images to this size first (your generator's output size; ADM protocol). "
                       "Default: native size.")
    stats.add_argument("--num_workers", type=int, default=0, help="DataLoader workers for --images_dir.")
    stats.add_argument("--skip_unreadable_images", action="store_true",
                       help="Skip images that cannot be decoded (corrupt or truncated files) instead of stopping at the "
                       "first one; their number is printed and stored in the statistics' metadata.")
    stats.add_argument("--label_column", default=None,
                       help="Integer class column of --dataset (ImageNet-style 'label'): also write per-class statistics "
                       "<encoder>.classes.safetensors (per-class FD, FJD) in the same pass.")
    stats.add_argument("--num_classes", type=_positive_int, default=None,
                       help="With --label_column: the number of classes (default: the column's ClassLabel size).")
    stats.add_argument("--label_embedding_scale", type=float, default=None,
                       help="With --label_column: alpha of FJD's label embedding alpha * one_hot(label). Default: "
                       "sqrt(trace(Sigma_features) / trace(Cov(one_hot))) per encoder (equal traces of both blocks).")
    stats.add_argument("--output_dir", required=True, help="Where to write <encoder>.safetensors.")
    stats.add_argument("--npz", action="store_true", help="Also write pytorch-fid-compatible <encoder>.npz files.")

    ev = sub.add_parser(
        "evaluate", help="FD of generated images in several representations, FDr and FD_r^k.",
        description="Generate --num_samples images from a pipeline (or read an image folder), compute FD against each "
        "reference stats file, FDr = FD / validation FD and FD_r^k = mean FDr; print a markdown table and save JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_encoder_args(ev)
    gen = ev.add_mutually_exclusive_group(required=True)
    gen.add_argument("--pipeline", help="diffusers pipeline folder or hub id; a training run's output folder (full "
                     "pipeline or LoRA with fd_onestep_lora.json) loads as FDOneStepPipeline.")
    gen.add_argument("--images", help="Folder of generated images.")
    ev.add_argument("--reference_stats", nargs="+", default=None, help="ReferenceStats .safetensors files, one per "
                    "encoder (matched by encoder id). Required unless --dataset (the protocol computes its own).")
    ev.add_argument("--num_samples", type=_positive_int, default=50000, help="Images to generate (with --pipeline) / max images read (with --images).")
    ev.add_argument("--batch_size", type=_positive_int, default=64, help="Images per generation / encoder call, per process.")
    ev.add_argument("--resolution", type=_positive_int, default=None,
                    help="With --images: center-crop-resize every image to this size first (as `stats --resolution`). "
                    "Default: native size, which must be the same for all images.")
    ev.add_argument("--skip_unreadable_images", action="store_true",
                    help="With --images: skip images that cannot be decoded (corrupt or truncated files) instead of "
                    "stopping at the first one; their number is printed and stored in the results' metadata.")
    ev.add_argument("--seed", type=int, default=0, help="Base seed; batch b uses seed + b.")
    ev.add_argument("--num_classes", type=int, default=None, help="Class-conditional pipelines: balanced labels i mod num_classes.")
    ev.add_argument("--class_labels", type=int, nargs="+", default=None, help="Class labels to cycle through.")
    ev.add_argument("--prompts_file", default=None, help="Text file with one prompt per line, cycled (text-to-image pipelines).")
    ev.add_argument("--pipeline_kwargs", default=None, help="JSON dict of extra pipeline call arguments, e.g. '{\"num_inference_steps\": 1}'.")
    ev.add_argument("--class_stats", nargs="+", default=None,
                    help="Per-class statistics <encoder>.classes.safetensors (`stats --label_column`), matched by encoder "
                    "id: per-class FD and FJD of the requested labels (--num_classes or --class_labels).")
    ev.add_argument("--classifier", default=None,
                    help="Adherence (share of samples classified as their requested label): a transformers image "
                    "classifier (AutoModelForImageClassification), a local folder or a Hub id.")
    ev.add_argument("--output", default=None, help="Write the results as JSON to this path.")
    ev.add_argument("--device", default=None, help="Device for the pipeline and encoders (default: accelerate's).")
    ev.add_argument("--clip_model", default=None,
                    help="CLIP score of prompted samples: a transformers CLIP / SigLIP with a text tower (AutoModel + "
                    "AutoProcessor), a local folder or a Hub id, e.g. openai/clip-vit-large-patch14.")
    _add_protocol_args(ev)

    imp = sub.add_parser(
        "import-npz", help="Import a pytorch-fid stats .npz or an ADM reference batch .npz.",
        description="pytorch-fid / ADM .npz -> ReferenceStats .safetensors (allow_pickle=False). With --encoders, the "
        "images of an ADM reference batch (arr_0) are encoded; without, precomputed mu/sigma are imported.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    imp.add_argument("npz", help="Input .npz file.")
    imp.add_argument("--output_dir", required=True)
    imp.add_argument("--encoder_id", default=None,
                     help="Required for precomputed mu/sigma: the encoder that computed them -- 'inception' (the FID "
                     "Inception of pytorch-fid and ADM) or the encoder id of the encoder you will evaluate with.")
    imp.add_argument("--batch_size", type=_positive_int, default=64)
    _add_encoder_args(imp, required=False)

    exp = sub.add_parser("export-npz", help="Export a ReferenceStats .safetensors as a pytorch-fid .npz (mu, sigma).")
    exp.add_argument("stats", help="Input .safetensors written by `fd-onestep stats`.")
    exp.add_argument("npz", help="Output .npz path.")
    _add_plan_parser(sub)
    from .demo import add_demo_parser

    add_demo_parser(sub)
    return parser


def _add_protocol_args(ev) -> None:
    from .evaluation import TEACHER_SCHEDULERS

    t2i = ev.add_argument_group(
        "text-to-image protocol (--pipeline with --dataset)",
        "Sample i from caption i of the first --num_samples rows; reference statistics of the same rows' images "
        "(cached by content); FD, FDr, FD_r^k, CLIP score (--clip_model) and adherence (--label_column, --classifier), "
        "every number with its sample count; with --teacher_steps K the teacher at K steps side by side.")
    t2i.add_argument("--dataset", default=None, help="🤗 dataset (datasets.load_dataset: Hub id, local folder or data "
                     "files, or a save_to_disk folder) with captions and images.")
    t2i.add_argument("--caption_column", default=None, help="Caption column of --dataset (the prompts).")
    t2i.add_argument("--image_column", default=None, help="Image column of --dataset (default: the first Image feature).")
    t2i.add_argument("--split", default="train", help="Split of --dataset whose first --num_samples rows are used.")
    t2i.add_argument("--validation_split", default=None, help="Held-out split of --dataset (its first --num_samples "
                     "rows): the validation FD of each representation, for FDr and FD_r^k.")
    t2i.add_argument("--label_column", default=None, help="Class each caption names: adherence with --classifier.")
    t2i.add_argument("--reference_cache", default=None, help="Folder of cached reference statistics (default: "
                     "$FD_ONESTEP_CACHE or ~/.cache/fd_onestep, then reference_stats/).")
    t2i.add_argument("--teacher_steps", type=_positive_int, default=None,
                     help="Also evaluate the run's teacher at this many steps, in the same table.")
    t2i.add_argument("--teacher", default=None, help="With --teacher_steps: the teacher pipeline (default: the run's "
                     "base model).")
    t2i.add_argument("--teacher_scheduler", default=None, choices=TEACHER_SCHEDULERS,
                     help="With --teacher_steps: the teacher's sampler (default: the run's --teacher_sampler, else "
                     "the teacher's own scheduler).")


def _add_plan_parser(sub) -> None:
    from .plan import DEFAULT_ENCODERS, DEFAULT_PEAK_TFLOPS, DEFAULT_UTILIZATION

    plan = sub.add_parser(
        "plan", help="Memory per GPU, compute and step time of a training run at real size, before renting a GPU.",
        description="Build every part of a training step at real size from configs (fake tensors: nothing is "
        "allocated, offline) and print memory per GPU by part, compute per sample by part, the largest batch that "
        "fits and a predicted step time. Saver flags are named as the training script names them "
        "(docs/memory_savers.md, docs/plan.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    plan.add_argument("--list", action="store_true", help="List the bundled real configs, one name a line, and exit.")
    # the training script's names and defaults (train_fd_onestep.py --plan parses its own flags into the same
    # settings: fd_onestep.plan.settings_from_args); the plan's older names stay as aliases
    plan.add_argument("--pretrained_model_name_or_path", "--teacher", dest="pretrained_model_name_or_path", default=None,
                      help="A bundled real config (see --list), a diffusers pipeline folder, or a Hub id (only its "
                      "*.json config files are fetched).")
    plan.add_argument("--resolution", type=_positive_int, default=None, help="Generated image side (default: the "
                      "teacher's native size).")
    plan.add_argument("--train_batch_size", "--batch_size", dest="train_batch_size", type=_positive_int, default=32,
                      help="Samples per GPU per step.")
    plan.add_argument("--use_lora", "--lora", dest="use_lora", action="store_true",
                      help="Train a LoRA (default: full fine-tune of the denoiser).")
    plan.add_argument("--lora_rank", type=_positive_int, default=8, help="LoRA rank.")
    plan.add_argument("--guidance_scale", type=float, default=1.0, help="Classifier-free guidance inside the one step "
                      "(1 = off): with true guidance (a negative prompt or the null class) the denoiser sees twice the "
                      "batch.")
    plan.add_argument("--max_sequence_length", type=_positive_int, default=None,
                      help="Text tokens of each prompt (default: the stock pipeline's).")
    plan.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                      help="Default: accelerate's config (ACCELERATE_MIXED_PRECISION or its config file; no without "
                      "one), as the training script.")
    plan.add_argument("--gpu_memory_gb", type=float, default=80.0, help="Memory of one GPU (GB = 1e9 bytes).")
    plan.add_argument("--encoders", nargs="+", default=list(DEFAULT_ENCODERS),
                      help="FD encoders of the run: inception, dinov2 (bundled configs) or local encoder folders. The "
                      "training script has no default (a run names its encoders); the plan assumes the two usual ones.")
    savers = plan.add_argument_group("memory savers (the training script's flags)")
    savers.add_argument("--gradient_checkpointing", action="store_true", help="Recompute the denoiser's activations.")
    savers.add_argument("--vae_gradient_checkpointing", action="store_true", help="Recompute the VAE decoder's activations.")
    savers.add_argument("--decode_micro_batch_size", type=_positive_int, default=None,
                        help="Decode this many latents at a time, each chunk checkpointed.")
    savers.add_argument("--surrogate_decoder", default=None,
                        help="Tiny decoder for the gradient: a bundled config (taesd, taesdxl, taesd3, taef1) or an "
                        "AutoencoderTiny folder.")
    savers.add_argument("--encoder_gradient_checkpointing", action="store_true", help="Recompute the FD encoders' activations.")
    speed = plan.add_argument_group("step time")
    speed.add_argument("--peak_tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                       help="The GPU's dense bf16 throughput in TFLOP/s (default: H100 SXM).")
    speed.add_argument("--utilization", type=float, default=DEFAULT_UTILIZATION, help="Share of --peak_tflops reached.")
    speed.add_argument("--num_gpus", type=_positive_int, default=8,
                       help="GPUs of a fully sharded data-parallel run (shown for a full fine-tune that does not fit one).")
    speed.add_argument("--fsdp", action="store_true", help="Plan a sharded run (FSDP2 over --num_gpus; text "
                       "encoders off the GPU, prompts stored on disk; docs/several_gpus.md).")
    plan.add_argument("--output", default=None, help="Also write the plan as JSON to this path.")


def _accelerator():
    import torch
    from accelerate import Accelerator

    # Without CUDA, cpu=True makes `accelerate launch --multi_gpu --num_processes N` start a gloo group.
    return Accelerator(cpu=not torch.cuda.is_available())


def _load_kwargs(args, device) -> dict:
    return dict(
        device=device,
        torch_dtype=args.encoder_dtype,
        local_files_only=True if args.local_files_only else None,
        cache_dir=args.cache_dir,
        weights_path=args.inception_weights,
    )


def _resolve(args, device):
    from .dataset_stats import resolve_encoders

    kwargs = _load_kwargs(args, device)
    if kwargs["weights_path"] is not None:
        # Only the inception encoder takes a weights file.
        from .encoders import INCEPTION_NAMES, encoder_file_stem, load_encoder

        weights = kwargs.pop("weights_path")
        encoders = {}
        for name in args.encoders:
            extra = {"weights_path": weights} if name.lower() in INCEPTION_NAMES else {}
            encoders[encoder_file_stem(name)] = load_encoder(name, **kwargs, **extra)
        return encoders
    return resolve_encoders(args.encoders, **kwargs)


def check_output_path(path: str, option: str, *, folder: bool) -> None:
    """Fail before the work, not after it: ``path`` (a folder, or a file when ``folder`` is False) can be written.

    Its nearest existing ancestor must be a writable folder (missing folders are created when saving).
    """
    target = Path(path).expanduser()
    if target.exists() and target.is_dir() != folder:
        kind, want = ("a file", "a folder (created if missing)") if folder else ("a folder", f"a file path such as '{target / 'results.json'}'")
        raise ValueError(f"{option} '{path}' is {kind}; pass {want}.")
    start = target if folder else target.parent
    ancestor = next(p for p in (start, *start.parents) if p.exists())
    if not ancestor.is_dir():
        raise ValueError(f"{option} '{path}' cannot be created: '{ancestor}' is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{option} '{path}' cannot be written: '{ancestor}' is not writable.")
    if ancestor != target:  # access() says yes to root everywhere, and /proc or /sys refuse new entries anyway
        import tempfile

        try:
            tempfile.TemporaryDirectory(dir=ancestor, prefix=".fd-onestep-probe-").cleanup()
        except OSError as err:
            raise ValueError(f"{option} '{path}' cannot be created: '{ancestor}' does not accept new folders "
                             f"({err.strerror}); pass a folder on a writable disk.") from None


def _cmd_stats(args) -> int:
    from .dataset_stats import (
        CLASS_STATS_SUFFIX,
        compute_class_conditional_stats,
        compute_reference_stats,
        save_reference_stats,
    )

    if args.label_column is None and (args.num_classes is not None or args.label_embedding_scale is not None):
        raise ValueError("--num_classes and --label_embedding_scale go with --label_column (per-class statistics).")
    if args.label_column is not None and args.dataset is None:
        raise ValueError("--label_column needs --dataset (a plain --images_dir has no labels; an imagefolder layout read "
                         "with --dataset has a 'label' column from its class subfolders).")
    check_output_path(args.output_dir, "--output_dir", folder=True)
    accelerator = _accelerator()
    encoders = _resolve(args, accelerator.device)
    options = dict(
        images_dir=args.images_dir,
        split=args.split,
        image_column=args.image_column,
        streaming=args.streaming,
        cache_dir=args.cache_dir,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        resolution=args.resolution,
        validation_split=args.validation_split,
        validation_images_dir=args.validation_images_dir,
        num_workers=args.num_workers,
        show_progress=True,
        skip_unreadable=args.skip_unreadable_images,
    )
    class_stats = {}
    if args.label_column is None:
        stats = compute_reference_stats(encoders, args.dataset, **options)
    else:
        stats, class_stats = compute_class_conditional_stats(
            encoders, args.dataset, label_column=args.label_column, num_classes=args.num_classes,
            alpha=args.label_embedding_scale, **options)
    paths = save_reference_stats(stats, args.output_dir)
    class_paths = save_reference_stats(class_stats, args.output_dir, suffix=CLASS_STATS_SUFFIX)
    if accelerator.is_main_process:
        for name, ref in stats.items():
            if args.npz:
                ref.to_npz(Path(args.output_dir) / f"{name}.npz")
            val = f", validation FD {ref.validation_fd:.4f}" if ref.validation_fd is not None else ""
            if args.skip_unreadable_images:
                val += f", {ref.metadata.get('skipped_unreadable_images', 0)} unreadable image(s) skipped"
            print(
                f"{name}: {ref.num_samples} images, {ref.encoder_id}, d={ref.feature_dim}{val} -> {paths[name]} "
                f"(computed by {accelerator.num_processes} process(es))"
            )
            if name in class_stats:
                cls = class_stats[name]
                print(f"{name}: {cls.num_classes} classes (counts {cls.class_counts.tolist()}), label embedding "
                      f"alpha {cls.alpha:.6g} -> {class_paths[name]}")
    accelerator.wait_for_everyone()
    return 0


def _pipeline_kwargs(text: Optional[str]) -> Optional[dict]:
    if not text:
        return None
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--pipeline_kwargs is not valid JSON ({err}): pass a JSON object, e.g. '{{\"guidance_scale\": 2.0}}'.") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--pipeline_kwargs must be a JSON object (keyword arguments of the pipeline call), got {text!r}.")
    return kwargs


def _is_text_pipeline(pipe) -> bool:
    """Whether a loaded pipeline is prompted (an FDOneStepPipeline says so; a stock one has a text encoder)."""
    known = getattr(pipe, "is_text_conditional", None)
    if isinstance(known, bool):
        return known
    return getattr(pipe, "text_encoder", None) is not None or getattr(pipe, "text_encoder_2", None) is not None


def _cmd_evaluate(args) -> int:
    from .evaluation import (
        LORA_INFO_FILE,
        evaluate_folder,
        evaluate_pipeline,
        image_classifier,
        load_class_references,
        load_pipeline,
        load_references,
    )
    from .training.inputs import read_prompts_file

    if args.dataset is not None:
        return _cmd_protocol(args)
    if args.reference_stats is None:
        raise ValueError("--reference_stats is required (one file per encoder), unless --dataset computes them.")
    protocol_only = [f"--{k}" for k in ("caption_column", "validation_split", "label_column", "reference_cache",
                                        "teacher_steps", "teacher", "teacher_scheduler") if getattr(args, k) is not None]
    if protocol_only:
        raise ValueError(f"{', '.join(protocol_only)} go with --dataset (the text-to-image protocol).")
    # options of the other source would be ignored silently: reject them before loading anything
    if args.images is not None:
        given = [f"--{k}" for k in ("class_labels", "num_classes", "prompts_file", "pipeline_kwargs", "class_stats",
                                    "classifier", "clip_model") if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --pipeline (generation); drop them with --images.")
    elif args.resolution is not None or args.skip_unreadable_images:
        flag = "--resolution" if args.resolution is not None else "--skip_unreadable_images"
        raise ValueError(f"{flag} applies to --images (reading files); a pipeline generates its own images.")
    conditional = args.class_stats is not None or args.classifier is not None
    if conditional and args.num_classes is None and args.class_labels is None:
        raise ValueError("--class_stats and --classifier measure how generated images follow their requested labels: "
                         "request labels with --num_classes (balanced) or --class_labels.")
    if args.num_samples < 2:  # before any model loads
        raise ValueError(f"--num_samples {args.num_samples}: FD needs a covariance, so at least 2 images "
                         "(10k-50k is standard); pass --num_samples 2 or more.")
    pipeline_kwargs = _pipeline_kwargs(args.pipeline_kwargs)
    if args.output:
        check_output_path(args.output, "--output", folder=False)
    accelerator = _accelerator()
    device = args.device or accelerator.device
    encoders = _resolve(args, device)
    references = load_references(args.reference_stats, encoders)
    class_references = load_class_references(args.class_stats, encoders) if args.class_stats else None
    classifier = image_classifier(args.classifier, device=device) if args.classifier else None
    clip_scorer = _clip_scorer(args, device)
    if args.images is not None:
        result = evaluate_folder(
            args.images, encoders, references, batch_size=args.batch_size, max_samples=args.num_samples,
            resolution=args.resolution, show_progress=accelerator.is_main_process,
            skip_unreadable=args.skip_unreadable_images,
        )
    else:
        prompts = None
        evaluated = {"source": args.pipeline}
        if args.prompts_file:
            prompts = read_prompts_file(args.prompts_file)
            if not prompts:
                raise ValueError(f"--prompts_file {args.prompts_file!r} has no prompts; write one prompt per line.")
            evaluated.update(prompts_file=args.prompts_file, num_prompts=str(len(prompts)))
        pipe = load_pipeline(args.pipeline, cache_dir=args.cache_dir, local_files_only=True if args.local_files_only else None)
        lora_info = Path(args.pipeline) / LORA_INFO_FILE
        if lora_info.is_file():  # a LoRA: the base model it was loaded onto, and the LoRA itself
            evaluated.update(lora=args.pipeline, base_model=str(json.loads(lora_info.read_text()).get("base_model")))
        if prompts is None and _is_text_pipeline(pipe):
            raise ValueError(f"{args.pipeline} is a text-to-image pipeline: pass prompts with --prompts_file FILE "
                             "(one prompt per line, cycled over the samples).")
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        result = evaluate_pipeline(
            pipe, encoders, references, args.num_samples, batch_size=args.batch_size, seed=args.seed,
            class_labels=args.class_labels, num_classes=args.num_classes, prompts=prompts,
            pipeline_kwargs=pipeline_kwargs, show_progress=accelerator.is_main_process,
            class_references=class_references, classifier=classifier, classifier_name=args.classifier,
            metadata=evaluated, clip_scorer=clip_scorer,
        )
    if accelerator.is_main_process:
        skipped = result.metadata.get("skipped_unreadable_images")
        if skipped is not None:
            print(f"{skipped} unreadable image(s) skipped; {result.num_samples} evaluated")
        print(result.to_markdown())
        if args.output:
            print(f"saved {result.save_json(args.output)}")
    accelerator.wait_for_everyone()
    return 0


def _clip_scorer(args, device):
    if args.clip_model is None:
        return None
    from .clip_score import CLIPScore

    hub = {k: v for k, v in (("local_files_only", args.local_files_only or None), ("cache_dir", args.cache_dir))
           if v is not None}
    return CLIPScore.from_pretrained(args.clip_model, device=device, batch_size=args.batch_size, **hub)


def _cmd_protocol(args) -> int:
    """``evaluate --pipeline RUN --dataset D --caption_column C``: the text-to-image protocol (evaluation.py)."""
    from .evaluation import (
        captioned_reference_stats,
        evaluate_pipeline,
        image_classifier,
        load_pipeline,
        load_teacher,
        protocol_markdown,
        protocol_to_dict,
        read_captioned_rows,
    )

    wrong = [f"--{k}" for k in ("images", "reference_stats", "prompts_file", "class_stats", "class_labels",
                                "num_classes") if getattr(args, k) is not None]
    if wrong or args.pipeline is None or args.caption_column is None:
        raise ValueError("the text-to-image protocol takes --pipeline RUN --dataset D --caption_column C"
                         + (f"; drop {', '.join(wrong)} (the dataset's captions are the prompts and its images the "
                            "reference)" if wrong else "") + ".")
    if args.classifier is not None and args.label_column is None:
        raise ValueError("adherence needs the class each caption names: pass --label_column with --classifier.")
    if args.output:
        check_output_path(args.output, "--output", folder=False)
    rows = read_captioned_rows(args.dataset, caption_column=args.caption_column, num_samples=args.num_samples,
                               image_column=args.image_column, split=args.split, label_column=args.label_column,
                               validation_split=args.validation_split, cache_dir=args.cache_dir)
    accelerator = _accelerator()
    device = args.device or accelerator.device
    hub = dict(cache_dir=args.cache_dir, local_files_only=True if args.local_files_only else None)
    generators = {"one step": (load_pipeline(args.pipeline, **hub), _pipeline_kwargs(args.pipeline_kwargs) or {})}
    if args.teacher_steps is not None:
        teacher, kwargs = load_teacher(args.pipeline, teacher=args.teacher, scheduler=args.teacher_scheduler, **hub)
        generators[f"teacher, {args.teacher_steps} steps"] = (teacher, {**kwargs, "num_inference_steps": args.teacher_steps})
    encoders = _resolve(args, device)
    references = captioned_reference_stats(encoders, rows, cache=args.reference_cache, resolution=args.resolution,
                                           batch_size=args.batch_size, cache_dir=args.cache_dir,
                                           show_progress=accelerator.is_main_process)
    classifier = image_classifier(args.classifier, device=device) if args.classifier else None
    clip_scorer = _clip_scorer(args, device)
    results = {}
    for name, (pipe, kwargs) in generators.items():
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        results[name] = evaluate_pipeline(
            pipe, encoders, references, args.num_samples, batch_size=args.batch_size, seed=args.seed,
            prompts=rows.captions, prompt_labels=rows.labels, pipeline_kwargs=kwargs, classifier=classifier,
            classifier_name=args.classifier, clip_scorer=clip_scorer, show_progress=accelerator.is_main_process,
            metadata={"source": args.pipeline if name == "one step" else "teacher", "generator": name,
                      **{k: str(v) for k, v in kwargs.items()}})
    if accelerator.is_main_process:
        print(protocol_markdown(results))
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(protocol_to_dict(results, rows), indent=2) + "\n")
            print(f"saved {args.output}")
    accelerator.wait_for_everyone()
    return 0


def _import_encoder_id(args) -> Optional[str]:
    """``--encoder_id`` of precomputed mu/sigma: required (an .npz does not say which encoder made it, except one
    written by export-npz)."""
    from .dataset_stats import exported_encoder_id
    from .encoders import INCEPTION_ENCODER_ID, INCEPTION_NAMES

    if args.encoders:
        if args.encoder_id is not None:
            raise ValueError("--encoder_id is for precomputed mu/sigma; with --encoders the images are encoded and "
                             "each encoder stores its own id. Drop one of the two.")
        return None
    if args.encoder_id is None and exported_encoder_id(args.npz):
        return None  # written by export-npz: the file names its encoder
    if args.encoder_id is None:
        raise ValueError(
            "--encoder_id is required: an .npz does not say which encoder computed its mu/sigma, and FD compares "
            f"statistics of one encoder only. Pass --encoder_id inception (= '{INCEPTION_ENCODER_ID}', the FID "
            "Inception of pytorch-fid and ADM), or the encoder id of the encoder you will evaluate with (the id "
            "`fd-onestep stats` prints, e.g. 'dinov2:<model>:cls:224'). To encode an ADM reference batch's images "
            "(arr_0) instead, pass --encoders."
        )
    return INCEPTION_ENCODER_ID if args.encoder_id.lower() in INCEPTION_NAMES else args.encoder_id


def _cmd_import(args) -> int:
    from .dataset_stats import import_npz_stats, save_reference_stats

    encoder_id = _import_encoder_id(args)
    check_output_path(args.output_dir, "--output_dir", folder=True)
    encoders = None
    if args.encoders:
        encoders = _resolve(args, None)
    stats = import_npz_stats(args.npz, encoders=encoders, encoder_id=encoder_id, batch_size=args.batch_size)
    for name, path in save_reference_stats(stats, args.output_dir).items():
        print(f"{name}: {stats[name].num_samples} images, {stats[name].encoder_id} -> {path}")
    return 0


def _cmd_export(args) -> int:
    from .dataset_stats import export_npz_stats

    print(f"saved {export_npz_stats(args.stats, args.npz)}")
    return 0


def _cmd_plan(args) -> int:
    from .plan import list_real_configs, make_plan, settings_from_args

    if args.list:
        print("\n".join(list_real_configs()))
        return 0
    if args.pretrained_model_name_or_path is None:
        raise ValueError("--teacher is required (--pretrained_model_name_or_path, the training script's name): a "
                         "bundled real config (fd-onestep plan --list), a pipeline folder or a Hub id.")
    if not 0 < args.utilization <= 1:
        raise ValueError(f"--utilization is a share of the peak throughput in (0, 1], got {args.utilization}.")
    if args.output:
        check_output_path(args.output, "--output", folder=False)
    settings = settings_from_args(args)
    plan = make_plan(settings)
    print(plan.to_markdown())
    if args.output:
        Path(args.output).write_text(json.dumps(plan.to_dict(), indent=2, default=str) + "\n")
        print(f"saved {args.output}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo_command

    return run_demo_command(args)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"stats": _cmd_stats, "evaluate": _cmd_evaluate, "import-npz": _cmd_import, "export-npz": _cmd_export,
                "plan": _cmd_plan, "demo": _cmd_demo}
    # A clear message, not a traceback: our errors name the problem and the fix, OSErrors their path. (The
    # commands' library calls also raise TypeError / RuntimeError for bad input, e.g. undecodable images.)
    return run_reporting_errors(f"fd-onestep {args.command}", handlers[args.command], args,
                                expected=(*EXPECTED_ERRORS, TypeError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
