"""The training script's argument checks: everything about a run that can be refused before a model loads, each
refusal one line naming the argument and the fix (``check_args`` after parsing, ``check_inputs`` on the input
files and the teacher's configs, ``check_run_setup`` on the output dir, the resume target and the Hub)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import math
from pathlib import Path

import torch
from accelerate.logging import get_logger

from fd_onestep.cli import check_output_path
from fd_onestep.errors import RunError
from fd_onestep.training.checkpoints import resolve_resume_checkpoint, set_aside_newer_checkpoints
from fd_onestep.training.hub import check_push_to_hub
from fd_onestep.training.inputs import load_caption_dataset, read_prompts_file
from fd_onestep.training.output_dir import OutputDirLock, check_no_overwrite, clear_previous_run
from fd_onestep.training.representations import demo_of, encoder_labels, label_aliases, load_reference
from fd_onestep.training.run_args import (
    RUN_ARGS_FILE,
    check_checkpoint_compatible,
    check_output_dir_compatible,
    parse_float_list,
    parse_name_list,
    run_fingerprint,
    write_run_args,
)

logger = get_logger(__name__, log_level="INFO")
_log = logging.getLogger(__name__)  # the helpers below also run before accelerate's state exists (tests, --plan)


def check_args(args):
    """Every argument that needs no model, after parsing: lists parsed, per-class statistics found next to the
    statistics files, and each refusal one line naming the argument and the fix (ValueError / FileNotFoundError).
    Returns ``args``."""
    if args.output_bound == "none":
        args.output_bound = None
    args.encoders = parse_name_list(args.encoders)
    args.reference_stats = parse_name_list(args.reference_stats)
    args.eval_encoders = parse_name_list(args.eval_encoders)
    args.eval_reference_stats = parse_name_list(args.eval_reference_stats)
    args.class_reference_stats = class_stats_paths(args.class_reference_stats, args.reference_stats, "--class_reference_stats")
    args.eval_class_reference_stats = class_stats_paths(args.eval_class_reference_stats, args.eval_reference_stats,
                                                        "--eval_class_reference_stats")
    args.lora_target_modules = parse_name_list(args.lora_target_modules) or None
    if not args.encoders:
        raise ValueError("--encoders is empty: name at least one encoder for the FD-loss.")
    if len(set(args.encoders)) != len(args.encoders):
        raise ValueError(f"--encoders lists an encoder twice: {args.encoders}; name each once.")
    if len(args.reference_stats) != len(args.encoders):
        raise ValueError(
            f"--reference_stats has {len(args.reference_stats)} files for {len(args.encoders)} encoders "
            f"({args.encoders}); pass one stats file per encoder, in the same order."
        )
    if len(args.eval_reference_stats) != len(args.eval_encoders):
        raise ValueError(
            f"--eval_reference_stats has {len(args.eval_reference_stats)} files for {len(args.eval_encoders)} "
            "--eval_encoders; pass one stats file per eval encoder, in the same order."
        )
    overlap = set(args.eval_encoders) & set(args.encoders)
    if overlap:
        raise ValueError(
            f"{sorted(overlap)} are both training and eval encoders; training encoders are always evaluated, "
            "drop them from --eval_encoders."
        )
    for path in [*args.reference_stats, *args.eval_reference_stats]:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"reference statistics file {path!r} does not exist; compute it with `fd-onestep stats` "
                "(one file per encoder) and pass its path."
            )
    weights = parse_float_list(args.encoder_loss_weights, "encoder_loss_weights")
    if weights and len(weights) != len(args.encoders):
        raise ValueError(
            f"--encoder_loss_weights has {len(weights)} values for {len(args.encoders)} encoders; pass one per encoder."
        )
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"--encoder_loss_weights must be finite and >= 0, got {weights}.")
    args.encoder_loss_weights = weights or [1.0] * len(args.encoders)

    if not 0.0 <= args.fd_ema_beta < 1.0:
        raise ValueError(f"--fd_ema_beta must be in [0, 1), got {args.fd_ema_beta}.")
    if args.fd_warmup_samples < 0:
        raise ValueError(f"--fd_warmup_samples must be >= 0, got {args.fd_warmup_samples}.")
    if args.fd_eps is not None and args.fd_eps <= 0:
        raise ValueError(f"--fd_eps must be > 0, got {args.fd_eps}.")
    if args.fd_population == "exact" and args.gradient_accumulation_steps != 1:
        raise ValueError(
            "--fd_population exact already accumulates gradients exactly over --fd_micro_batches; use "
            "--fd_micro_batches instead of --gradient_accumulation_steps (set it to 1)."
        )
    if args.fd_population == "exact" and args.fd_micro_batches < 2:
        raise ValueError("--fd_population exact needs --fd_micro_batches >= 2 (1 is the plain batch: use ema or queue).")
    if args.fd_condition == "joint" and any(path is None for path in args.class_reference_stats):
        missing = [stats for stats, path in zip(args.reference_stats, args.class_reference_stats) if path is None]
        raise ValueError(
            f"--fd_condition joint needs per-class statistics of every training encoder; none found for {missing}. "
            "Compute them with `fd-onestep stats --label_column label ...` and pass --class_reference_stats, or "
            "use --fd_condition marginal."
        )
    if not (math.isfinite(args.fd_label_scale) and args.fd_label_scale > 0):
        raise ValueError(f"--fd_label_scale must be a positive number, got {args.fd_label_scale}.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}.")
    if not (0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1):
        raise ValueError("--adam_beta1 and --adam_beta2 must be in [0, 1).")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError("--checkpoints_total_limit must be >= 1 (omit it to keep every checkpoint).")
    for name in ("checkpointing_steps", "validation_steps", "num_validation_images", "num_validation_samples",
                 "num_output_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.use_ema and not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1), got {args.ema_decay}.")
    aliases = label_aliases(args)
    train_labels = encoder_labels(args.encoders, "--encoders", aliases)
    check_adversarial_args(args, train_labels, dict(zip(args.encoders, train_labels)))
    eval_labels = encoder_labels(args.eval_encoders, "--eval_encoders", aliases)
    if set(train_labels) & set(eval_labels):
        raise ValueError(f"--encoders {train_labels} and --eval_encoders {eval_labels} share short names; rename one.")
    if args.keep_best_by is not None:
        by_raw = dict(zip(args.encoders + args.eval_encoders, train_labels + eval_labels))
        args.keep_best_by = by_raw.get(args.keep_best_by, args.keep_best_by)
        allowed = {"fd_mean", "fd_r_mean", *train_labels}
        if args.keep_best_by in eval_labels:
            raise ValueError(
                f"--keep_best_by {args.keep_best_by!r} is an eval-only encoder: selecting checkpoints with it would "
                "tune the held-out measure. Use a training encoder, 'fd_mean' or 'fd_r_mean'."
            )
        if args.keep_best_by not in allowed:
            raise ValueError(f"--keep_best_by {args.keep_best_by!r} is unknown; use one of {sorted(allowed)}.")
        if not args.num_validation_samples:
            raise ValueError("--keep_best_by needs fresh-sample FDs: set --num_validation_samples > 0.")
    if args.final_weights == "best" and args.keep_best_by is None:
        raise ValueError("--final_weights best needs --keep_best_by (which FD decides what is best).")
    if args.prompts_file is not None and args.dataset_name is not None:
        raise ValueError("give either --prompts_file or --dataset_name for the prompts, not both.")
    if args.prompts_file is not None and not Path(args.prompts_file).is_file():
        raise FileNotFoundError(f"--prompts_file {args.prompts_file!r} does not exist; pass a text file, one prompt per line.")
    if args.class_histogram is not None and not Path(args.class_histogram).is_file():
        raise FileNotFoundError(f"--class_histogram {args.class_histogram!r} does not exist; pass a JSON list of counts.")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed_precision fp16 needs a CUDA GPU; on CPU use bf16 or no.")
    if args.resolution is not None and args.resolution < 1:
        raise ValueError(f"--resolution must be >= 1, got {args.resolution}.")
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise ValueError("--stop_after_steps must be >= 1.")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ValueError(
            f"--output_dir {args.output_dir!r} is a file, not a folder; pass a new or existing folder for the "
            "pipeline, checkpoints and samples."
        )
    check_output_path(args.output_dir, "--output_dir", folder=True)
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        raise ValueError("--overwrite_output_dir starts the run over and --resume_from_checkpoint continues it; "
                         "pass one of the two.")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        raise FileNotFoundError(
            f"--inception_weights {args.inception_weights!r} does not exist; pass the path of "
            "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID Inception weights)."
        )
    if args.report_to == "none":
        args.report_to = None
    return args


def check_adversarial_args(args, train_labels: list[str], labels_of: dict[str, str]) -> None:
    """``--adv_*``: the weight, the encoder (a training one: the held-out ones only judge) and the real images."""
    if not (math.isfinite(args.adv_weight) and args.adv_weight >= 0):
        raise ValueError(f"--adv_weight must be a finite number >= 0 (0: off), got {args.adv_weight}.")
    if args.adv_weight == 0:
        return
    if args.adv_encoder is None:
        args.adv_encoder = train_labels[0]
    args.adv_encoder = labels_of.get(args.adv_encoder, args.adv_encoder)
    if args.adv_encoder not in train_labels:
        raise ValueError(f"--adv_encoder {args.adv_encoder!r} is not a training encoder ({train_labels}): the "
                         "discriminator sees a training representation (held-out ones only judge).")
    if args.adv_real_images is None and demo_of(args) is None:
        raise ValueError("--adv_weight > 0 needs real images for the discriminator: pass --adv_real_images FOLDER "
                         "(the images the reference statistics were computed from).")
    if args.adv_real_images is not None and not Path(args.adv_real_images).is_dir():
        raise FileNotFoundError(f"--adv_real_images {args.adv_real_images!r} is not a folder; pass a folder of images.")
    if not args.adv_learning_rate > 0:
        raise ValueError(f"--adv_learning_rate must be > 0, got {args.adv_learning_rate}.")


def class_stats_paths(given, stats_paths, flag: str) -> list:
    """Per-class statistics file of each encoder: ``given`` (one per stats file), else the
    ``<stats>.classes.safetensors`` next to each stats file where there is one (None where not)."""
    from fd_onestep.dataset_stats import CLASS_STATS_SUFFIX

    given = parse_name_list(given)
    if given:
        if len(given) != len(stats_paths):
            raise ValueError(f"{flag} has {len(given)} files for {len(stats_paths)} encoders; pass one per encoder.")
        for path in given:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{flag} file {path!r} does not exist; compute it with `fd-onestep stats "
                                        "--label_column label ...` (it writes <encoder>.classes.safetensors).")
        return list(given)
    found = []
    for stats in stats_paths:
        path = Path(stats)
        candidate = path.with_name(path.with_suffix("").name + CLASS_STATS_SUFFIX)
        found.append(str(candidate) if candidate.is_file() else None)
    return found


def teacher_config_file(args, filename: str) -> dict | None:
    """A JSON config file of the teacher (``model_index.json``, ``vae/config.json``...), read without any weights:
    from its folder, or from the Hub or its cache; None where it cannot be read (the loading then says why)."""
    root = Path(args.pretrained_model_name_or_path)
    try:
        if root.is_dir():
            path = root / filename
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(args.pretrained_model_name_or_path, filename, revision=args.revision,
                                        cache_dir=args.cache_dir, local_files_only=args.local_files_only))
        return json.loads(path.read_text()) if path.is_file() else None
    except Exception:  # offline, not on the Hub, not JSON: from_teacher gives the precise error later
        return None


def check_inputs(args) -> None:
    """Everything about the inputs that needs no model, before any loads: encoder names, statistics files (finite,
    made with the named encoder), prompts, the resolution against the VAE, LoRA targets and rank against the
    denoiser's module names (the denoiser built from its config on the meta device: no weights, no memory).
    Raises ValueError naming the argument and the fix; warns about a LoRA rank above the targeted layers' width."""
    from fd_onestep.encoders import check_encoder_name, expected_encoder_id

    for flag, names in (("--encoders", args.encoders), ("--eval_encoders", args.eval_encoders)):
        for name in names:
            try:
                check_encoder_name(name)
            except ValueError as err:
                raise ValueError(f"{flag}: {err}") from None
    for name, path in [*zip(args.encoders, args.reference_stats), *zip(args.eval_encoders, args.eval_reference_stats)]:
        full_id, model = expected_encoder_id(name)
        ref = load_reference(path, full_id)
        if not (torch.isfinite(ref.mu).all() and torch.isfinite(ref.sigma).all()):
            raise ValueError(f"reference statistics {path!r} hold NaN or infinite values; recompute them with "
                             "`fd-onestep stats` (with --skip_unreadable_images if some images are damaged).")
        made_with = ref.encoder_id
        parts = (made_with or "").split(":")
        if made_with and ((full_id and made_with != full_id) or (model and (len(parts) < 4 or parts[1] != model))):
            raise ValueError(
                f"--encoders {name!r} with reference stats {path!r}: the statistics were computed with encoder "
                f"{made_with!r}, not {full_id or model!r}. Pass each encoder's own statistics, in the order of "
                f"--encoders, or compute them: `fd-onestep stats --encoders {name} ...`."
            )
    if args.prompts_file is not None and not read_prompts_file(args.prompts_file):
        raise ValueError(f"--prompts_file {args.prompts_file!r} has no prompts; write one prompt per line.")
    index = teacher_config_file(args, "model_index.json")
    if index is None:
        return
    text_model = "text_encoder" in index or "text_encoder_2" in index
    check_conditioning_args(args, index)
    demo = demo_of(args)
    demo_prompts = demo is not None and demo.training_prompts() is not None
    if text_model and not demo_prompts and args.prompts_file is None and args.dataset_name is None:
        raise ValueError(
            f"{args.pretrained_model_name_or_path} is a text-to-image model ({index.get('_class_name')}): pass "
            "training prompts with --prompts_file FILE or --dataset_name NAME --caption_column COLUMN."
        )
    if not text_model and (args.prompts_file or args.dataset_name):
        raise ValueError(f"{args.pretrained_model_name_or_path} is not a text model: drop --prompts_file/--dataset_name.")
    vae = teacher_config_file(args, "vae/config.json") if "vae" in index else None
    # the downsampling factor as the family adapters compute it (AutoencoderKL; SANA's AutoencoderDC)
    blocks = (vae or {}).get("block_out_channels") or (vae or {}).get("encoder_block_out_channels")
    if args.resolution is not None and blocks:
        factor = 2 ** (len(blocks) - 1)
        if args.resolution % factor:
            raise ValueError(
                f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {factor}; "
                f"use a multiple of {factor}."
            )
    if args.use_lora:
        check_lora_targets(args, index)


def check_lora_targets(args, index: dict) -> None:
    """``--lora_target_modules`` against the denoiser's module names, and ``--lora_rank`` against the targeted
    layers' widths, on the denoiser built from its config on the meta device (PEFT's suffix matching)."""
    import diffusers
    from accelerate import init_empty_weights

    from fd_onestep.pipelines.pipeline_fd_onestep import DEFAULT_LORA_TARGETS, family_of_denoiser

    component = next((c for c in ("unet", "transformer") if c in index), None)
    config = teacher_config_file(args, f"{component}/config.json") if component else None
    model_class = getattr(diffusers, str((index.get(component) or [None, None])[1]), None) if component else None
    if config is None or model_class is None:
        return
    try:
        with init_empty_weights():
            denoiser = model_class.from_config(config)
        family = family_of_denoiser(denoiser)
    except Exception:  # not a supported denoiser: from_teacher's own error is the clear one
        return
    targets = args.lora_target_modules or DEFAULT_LORA_TARGETS[family]
    modules = dict(denoiser.named_modules())
    matched = {t: [n for n in modules if n == t or n.endswith("." + t)] for t in targets}
    unmatched = [t for t, names in matched.items() if not names]
    if unmatched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                           if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))})
        raise ValueError(
            f"--lora_target_modules {unmatched} match no module of the teacher's {component} ({model_class.__name__}). "
            f"Its linear and convolution layers end in: {', '.join(suffixes[:30])}; pass some of those "
            f"(default for {family}: {' '.join(DEFAULT_LORA_TARGETS[family])})."
        )
    widths = {n: min(getattr(m, "in_features", 0) or m.in_channels, getattr(m, "out_features", 0) or m.out_channels)
              for names in matched.values() for n in names
              if isinstance(modules[n], (torch.nn.Linear, torch.nn.Conv2d)) for m in [modules[n]]}
    narrow = {n: w for n, w in widths.items() if w < args.lora_rank}
    if narrow:
        name, width = min(narrow.items(), key=lambda item: item[1])
        logger.warning(
            f"--lora_rank {args.lora_rank} exceeds the width of {len(narrow)} of the {len(widths)} targeted layers "
            f"(e.g. {name}: {width}): a LoRA of rank r on a layer of width w < r is still rank w, and only costs "
            f"memory and time. Lower --lora_rank to at most {max(widths.values())} (the widest targeted layer)."
        )


def check_run_setup(args, accelerator):
    """Everything that can fail before a model is loaded: Hub credentials, resume target, output dir.

    Returns ``(fingerprint, resume_path, hub_repo_id, hub_token)``; writes the run's arguments.
    """
    output_dir = Path(args.output_dir)
    hub_repo_id = hub_token = None
    if args.push_to_hub:
        hub_repo_id, hub_token = check_push_to_hub(args.hub_token, args.hub_model_id, output_dir)
    elif args.hub_token:
        logger.warning("--hub_token is ignored without --push_to_hub (and is never saved or logged).")
    # the caption dataset by its content: datasets' own fingerprint of the loaded split
    dataset_fingerprint = load_caption_dataset(args)._fingerprint if args.dataset_name is not None else None
    fingerprint = run_fingerprint(args, accelerator.num_processes, dataset_fingerprint)
    resume_path = resolve_resume_checkpoint(args.resume_from_checkpoint, output_dir)
    # The main process alone takes the folder (lock; overwrite refusal or clean-up); every process learns the outcome.
    lock, refusal = OutputDirLock(output_dir), None
    if accelerator.is_main_process:
        try:
            if not args.overwrite_output_dir:
                # another run's checkpoints: say which arguments differ before refusing to write over them
                check_output_dir_compatible(output_dir, fingerprint)
            check_no_overwrite(output_dir, resuming=resume_path is not None, overwrite=args.overwrite_output_dir)
            lock.acquire()
            if args.overwrite_output_dir:
                clear_previous_run(output_dir, [RUN_ARGS_FILE])
        except (RunError, ValueError) as err:
            refusal = err
    raise_if_main_refused(accelerator, refusal)
    if resume_path is not None:
        check_checkpoint_compatible(resume_path, fingerprint)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_run_args(output_dir, args, fingerprint)
        set_aside_newer_checkpoints(output_dir, resume_path)
    accelerator.wait_for_everyone()
    return fingerprint, resume_path, hub_repo_id, hub_token, lock


def raise_if_main_refused(accelerator, refusal: Exception | None) -> None:
    """Raise ``refusal`` on the main process and a :class:`RunError` on the others (which print nothing: the
    main process says why). One broadcast of a flag on the process's device."""
    from accelerate.utils import broadcast

    flag = torch.tensor([0 if refusal is None else 1], dtype=torch.int32, device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = broadcast(flag, from_process=0)
    if refusal is not None:
        raise refusal
    if int(flag.item()):
        raise RunError("the main process refused this run (its message says why).")


# A float with an exponent or a sign argparse does not take as a negative number ('-1e-4', '-.5e3', '-inf').
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


def join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with ``--flag -1e-4`` written ``--flag=-1e-4`` for every option of ``parser`` that takes one value.

    argparse takes ``-1e-4`` for an option (its negative-number pattern has no exponent) and answers "expected one
    argument"; joined, the value reaches the option's type and range checks, which name the fix."""
    single = {opt for action in parser._actions if action.option_strings and action.nargs in (None, 1)
              and not isinstance(action, (argparse._StoreConstAction, argparse.BooleanOptionalAction))
              for opt in action.option_strings}
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token in single and i + 1 < len(argv) and _NEGATIVE_NUMBER.match(argv[i + 1]):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def check_conditioning_args(args, index: dict) -> None:
    """Class-label options need a class-conditional teacher (its denoiser has ``num_class_embeds`` / a label
    embedding); on a text or unconditional teacher they would be ignored, so they are refused. ``index`` is the
    teacher's ``model_index.json``."""
    text_model = "text_encoder" in index or "text_encoder_2" in index
    given = [flag for flag, on in (("--class_label_distribution reference", args.class_label_distribution != "uniform"),
                                   ("--class_histogram", args.class_histogram is not None)) if on]
    if given and text_model:
        raise ValueError(
            f"{' and '.join(given)}: {args.pretrained_model_name_or_path or args.embedded_default} is a text-to-image "
            "model, whose conditioning is its prompts (their mix is the prompts file's), not class labels; drop "
            f"{' and '.join(f.split()[0] for f in given)}."
        )


def prompt_token_limits(pipe) -> list[tuple[str, object, int]]:
    """``(what counts, count, tokens read)`` for each of a text pipeline's tokenizers: ``count(prompts)`` gives each
    prompt's tokens. A CLIP tokenizer reads its ``model_max_length`` (77); a T5 / Gemma / Qwen / Mistral one the
    pipeline's ``max_sequence_length`` (SD3, Flux, SANA, the 2026 families), counted with the prompt template the
    stock pipeline wraps each prompt in (the family adapter's ``prompt_token_counts``: FLUX.2's system message,
    Qwen3's chat template). A processor (FLUX.2-dev's ``PixtralProcessor``) counts with its text tokenizer."""
    from fd_onestep.prompt_store import text_tokenizer  # imports the pipeline module

    max_sequence_length = getattr(getattr(pipe, "config", None), "max_sequence_length", None)
    adapter = getattr(pipe, "adapter", None)
    out = []
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is None:
            continue
        tokenizer = text_tokenizer(tokenizer)
        limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
        if "CLIP" not in type(tokenizer).__name__ and max_sequence_length:
            limit = int(max_sequence_length)
        if not 0 < limit < 100_000:  # a tokenizer without a limit truncates nothing
            continue
        what = type(tokenizer).__name__

        def count(prompts, tokenizer=tokenizer):
            return [len(ids) for ids in tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]]

        if name == "tokenizer" and max_sequence_length and adapter is not None \
                and adapter.prompt_token_counts(["a"]) is not None:
            what, count = f"{what}, with the pipeline's prompt template", adapter.prompt_token_counts
        out.append((what, count, limit))
    return out


def warn_long_prompts(prompts: list[str] | None, limits: list[tuple[str, object, int]], flag: str = "--prompts_file") -> int:
    """Warn once when prompts are longer than a text encoder reads: they are truncated to its
    ``max_sequence_length``, as the stock pipelines do. ``limits``: :func:`prompt_token_limits`. Returns the
    number of prompts that are cut."""
    most = 0
    for what, count, limit in limits if prompts else ():
        cut = [n for n in count(list(prompts)) if n > limit]
        if cut:
            _log.warning(
                f"{len(cut)} of {len(prompts)} prompts ({flag}) are longer than the text encoder's "
                f"max_sequence_length of {limit} tokens ({what}; the longest has {max(cut)}): "
                f"they are truncated to their first {limit} tokens, as the stock pipeline does. Shorten them to keep "
                "every word."
            )
            most = max(most, len(cut))
    return most
