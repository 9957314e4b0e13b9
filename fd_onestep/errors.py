"""Expected errors of the command-line tools, and the one way they are shown: ``<prog>: error: <message>``.

The ``fd-onestep`` CLI and ``train_scripts/train_fd_onestep.py`` both run their ``main`` through
:func:`run_reporting_errors`: bad input, missing or damaged files and refused runs end in one line naming the
problem and the fix, and a non-zero exit status; any other exception is a bug and keeps its traceback.

Under several processes (``accelerate launch --multi_gpu``) every process usually hits the same error (the
same arguments, the same files): only the global main process prints it. Under ``accelerate launch`` the line
goes to stdout: accelerate's launcher re-raises the tail of its child's stderr, which would print it twice.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["RunError", "EXPECTED_ERRORS", "ERROR_EXIT_CODE", "error_line", "report_error", "run_reporting_errors"]


class RunError(RuntimeError):
    """A run refused or stopped for a reason the user can act on (a live lock, a damaged checkpoint, ...)."""


# Errors our code raises with a message that names the problem and the fix (and OSErrors, which name their path).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RunError)
ERROR_EXIT_CODE = 2  # argparse's status for a usage error


def error_line(prog: str, err: BaseException) -> str:
    """``"<prog>: error: <message>"`` on one line (a multi-line message keeps its lines, indented)."""
    message = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in message:
        message = f"{message}: {err.filename}"
    return f"{prog}: error: {message}"


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("0", "")


def _launched_by_accelerate() -> bool:
    # set by `accelerate launch` for its child (single-process and torchrun launches alike)
    return "ACCELERATE_MIXED_PRECISION" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ


def report_error(prog: str, err: BaseException) -> None:
    """Print :func:`error_line` once: on the global main process only, to stdout under ``accelerate launch``."""
    if not _is_main_process():
        return
    stream = sys.stdout if _launched_by_accelerate() else sys.stderr
    print(error_line(prog, err), file=stream, flush=True)


def run_reporting_errors(prog: str, fn: Callable[..., Any], *args, expected=EXPECTED_ERRORS, **kwargs) -> int:
    """Call ``fn``; return its exit status (an int, else 0), or :data:`ERROR_EXIT_CODE` after
    :func:`report_error` for an ``expected`` error."""
    try:
        status = fn(*args, **kwargs)
    except expected as err:
        report_error(prog, err)
        return ERROR_EXIT_CODE
    return status if isinstance(status, int) else 0
