"""Stop handling: SIGTERM / SIGINT finish the current step on every process, checkpoint, and stop."""

from __future__ import annotations

import signal
import threading

import torch
from accelerate.logging import get_logger

logger = get_logger(__name__, log_level="INFO")


class StopRequest:
    """SIGTERM / SIGINT (preemption, a scheduler's time limit, Ctrl-C): finish the current step, checkpoint, stop.

    The handlers only note the signal; :meth:`agreed` is checked after every step and tells all processes
    at once (a sum over processes of a flag on the process's device), so they stop after the same step. A
    second Ctrl-C stops at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}
        return self

    def _note(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logger.warning(f"{self.received} received: finishing this step, then writing a checkpoint and stopping "
                       "(Ctrl-C again to stop at once).", main_process_only=False)

    def agreed(self, accelerator) -> bool:
        """Whether any process received a stop signal (a collective: every process calls it after each step)."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32, device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return int(flag.item()) > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
