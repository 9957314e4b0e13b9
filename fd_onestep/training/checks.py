"""Checks of the training script's arguments and inputs that need no model: each bad input is one line naming the
problem and the fix, raised before anything loads (``train_scripts/train_fd_onestep.py`` calls them).

- :func:`join_negative_values`: ``--learning_rate -1e-4`` parses as a value (argparse reads a token that starts
  with ``-`` and is not one of its plain negative-number forms, such as ``-1e-4``, as an option);
- :func:`read_prompts_file`: a prompts file that is not UTF-8 names the file, the line and the fix;
- :func:`check_conditioning_args`: class-label options on a teacher without class labels are refused;
- :func:`warn_long_prompts`: prompts longer than the text encoder reads are said to be truncated, once, by us.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

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


def prompt_token_limits(pipe) -> list[tuple[object, int]]:
    """``(tokenizer, tokens read)`` of each of a text pipeline's tokenizers: a CLIP tokenizer reads its
    ``model_max_length`` (77); a T5 / Gemma one the pipeline's ``max_sequence_length`` (SD3, Flux, SANA)."""
    max_sequence_length = getattr(getattr(pipe, "config", None), "max_sequence_length", None)
    out = []
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is None:
            continue
        limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
        if "CLIP" not in type(tokenizer).__name__ and max_sequence_length:
            limit = int(max_sequence_length)
        if 0 < limit < 100_000:  # a tokenizer without a limit truncates nothing
            out.append((tokenizer, limit))
    return out


def warn_long_prompts(prompts: list[str] | None, limits: list[tuple[object, int]], flag: str = "--prompts_file") -> int:
    """Warn once when prompts are longer than a text encoder reads: they are truncated to its
    ``max_sequence_length``, as the stock pipelines do. ``limits``: :func:`prompt_token_limits`. Returns the
    number of prompts that are cut."""
    most = 0
    for tokenizer, limit in limits if prompts else ():
        lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]]
        cut = [n for n in lengths if n > limit]
        if cut:
            logger.warning(
                f"{len(cut)} of {len(prompts)} prompts ({flag}) are longer than the text encoder's "
                f"max_sequence_length of {limit} tokens ({type(tokenizer).__name__}; the longest has {max(cut)}): "
                f"they are truncated to their first {limit} tokens, as the stock pipeline does. Shorten them to keep "
                "every word."
            )
            most = max(most, len(cut))
    return most
