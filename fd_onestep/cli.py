"""``fd-onestep``: reference statistics and FD_r^k evaluation from the command line.

    fd-onestep stats     --encoders inception dinov2 --dataset <hub id or folder> --output_dir stats/
    fd-onestep evaluate  --pipeline <dir or hub id> | --images <folder>  --encoders ... --reference_stats ...
    fd-onestep import-npz ref.npz --output_dir stats/ [--encoders inception dinov2]
    fd-onestep export-npz stats/inception.safetensors inception.npz

``stats`` and ``evaluate`` run under ``accelerate launch`` with several processes (each process
takes a shard; moments are summed at the end). Without a GPU, accelerate's CPU processes use gloo.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{stats,evaluate,import-npz,export-npz}")

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
    stats.add_argument("--max_samples", type=int, default=None, help="Use only the first N images.")
    stats.add_argument("--batch_size", type=int, default=64, help="Images per encoder call, per process.")
    stats.add_argument("--resolution", type=int, default=None,
                       help="Center-crop-resize images to this size first (your generator's output size; ADM protocol). "
                       "Default: native size.")
    stats.add_argument("--num_workers", type=int, default=0, help="DataLoader workers for --images_dir.")
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
    gen.add_argument("--pipeline", help="diffusers pipeline folder or hub id (DiffusionPipeline.from_pretrained).")
    gen.add_argument("--images", help="Folder of generated images.")
    ev.add_argument("--reference_stats", nargs="+", required=True, help="ReferenceStats .safetensors files, one per encoder (matched by encoder id).")
    ev.add_argument("--num_samples", type=int, default=50000, help="Images to generate (with --pipeline) / max images read (with --images).")
    ev.add_argument("--batch_size", type=int, default=64, help="Images per generation / encoder call, per process.")
    ev.add_argument("--seed", type=int, default=0, help="Base seed; batch b uses seed + b.")
    ev.add_argument("--num_classes", type=int, default=None, help="Class-conditional pipelines: balanced labels i mod num_classes.")
    ev.add_argument("--class_labels", type=int, nargs="+", default=None, help="Class labels to cycle through.")
    ev.add_argument("--prompts_file", default=None, help="Text file with one prompt per line, cycled (text-to-image pipelines).")
    ev.add_argument("--pipeline_kwargs", default=None, help="JSON dict of extra pipeline call arguments, e.g. '{\"num_inference_steps\": 1}'.")
    ev.add_argument("--output", default=None, help="Write the results as JSON to this path.")
    ev.add_argument("--device", default=None, help="Device for the pipeline and encoders (default: accelerate's).")

    imp = sub.add_parser(
        "import-npz", help="Import a pytorch-fid stats .npz or an ADM reference batch .npz.",
        description="pytorch-fid / ADM .npz -> ReferenceStats .safetensors (allow_pickle=False). With --encoders, the "
        "images of an ADM reference batch (arr_0) are encoded; without, precomputed mu/sigma are imported.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    imp.add_argument("npz", help="Input .npz file.")
    imp.add_argument("--output_dir", required=True)
    imp.add_argument("--encoder_id", default=None, help="Encoder id of precomputed mu/sigma (default: the FID Inception id).")
    imp.add_argument("--batch_size", type=int, default=64)
    _add_encoder_args(imp, required=False)

    exp = sub.add_parser("export-npz", help="Export a ReferenceStats .safetensors as a pytorch-fid .npz (mu, sigma).")
    exp.add_argument("stats", help="Input .safetensors written by `fd-onestep stats`.")
    exp.add_argument("npz", help="Output .npz path.")
    return parser


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


def _cmd_stats(args) -> int:
    from .dataset_stats import compute_reference_stats, save_reference_stats

    accelerator = _accelerator()
    encoders = _resolve(args, accelerator.device)
    stats = compute_reference_stats(
        encoders,
        args.dataset,
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
    )
    paths = save_reference_stats(stats, args.output_dir)
    if accelerator.is_main_process:
        for name, ref in stats.items():
            if args.npz:
                ref.to_npz(Path(args.output_dir) / f"{name}.npz")
            val = f", validation FD {ref.validation_fd:.4f}" if ref.validation_fd is not None else ""
            print(
                f"{name}: {ref.num_samples} images, {ref.encoder_id}, d={ref.feature_dim}{val} -> {paths[name]} "
                f"(computed by {accelerator.num_processes} process(es))"
            )
    accelerator.wait_for_everyone()
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluation import evaluate_folder, evaluate_pipeline, load_references

    accelerator = _accelerator()
    device = args.device or accelerator.device
    encoders = _resolve(args, device)
    references = load_references(args.reference_stats, encoders)
    if args.images is not None:
        result = evaluate_folder(
            args.images, encoders, references, batch_size=args.batch_size,
            max_samples=args.num_samples, show_progress=accelerator.is_main_process,
        )
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(args.pipeline, cache_dir=args.cache_dir,
                                                     local_files_only=True if args.local_files_only else None)
        except Exception as err:  # noqa: BLE001 - rephrased with the fix
            raise FileNotFoundError(
                f"Could not load the pipeline '{args.pipeline}' ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                "Pass a local pipeline folder (save_pretrained) or a hub id available in the HF cache."
            ) from None
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        prompts = None
        if args.prompts_file:
            prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        result = evaluate_pipeline(
            pipe, encoders, references, args.num_samples, batch_size=args.batch_size, seed=args.seed,
            class_labels=args.class_labels, num_classes=args.num_classes, prompts=prompts,
            pipeline_kwargs=json.loads(args.pipeline_kwargs) if args.pipeline_kwargs else None,
            show_progress=accelerator.is_main_process,
        )
    if accelerator.is_main_process:
        print(result.to_markdown())
        if args.output:
            print(f"saved {result.save_json(args.output)}")
    accelerator.wait_for_everyone()
    return 0


def _cmd_import(args) -> int:
    from .dataset_stats import import_npz_stats, save_reference_stats

    encoders = None
    if args.encoders:
        encoders = _resolve(args, None)
    stats = import_npz_stats(args.npz, encoders=encoders, encoder_id=args.encoder_id, batch_size=args.batch_size)
    for name, path in save_reference_stats(stats, args.output_dir).items():
        print(f"{name}: {stats[name].num_samples} images, {stats[name].encoder_id} -> {path}")
    return 0


def _cmd_export(args) -> int:
    from .dataset_stats import export_npz_stats

    print(f"saved {export_npz_stats(args.stats, args.npz)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"stats": _cmd_stats, "evaluate": _cmd_evaluate, "import-npz": _cmd_import, "export-npz": _cmd_export}
    try:
        return handlers[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        # A clear message, not a traceback: our errors already name the problem and the fix.
        print(f"fd-onestep {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
