"""One run per output folder: a run's checkpoints are never overwritten, and two live runs never share a folder.

- :func:`check_no_overwrite`: an ``--output_dir`` holding checkpoints is continued (``--resume_from_checkpoint``)
  or deliberately started over (``--overwrite_output_dir``, :func:`clear_previous_run`), never silently restarted.
- :class:`OutputDirLock`: ``<output_dir>/.fd_onestep.lock`` names the process (host, PID) of the run writing
  there; a second run on the same folder is refused while that process lives, and the lock of a run that
  crashed (its PID gone on this host) is cleaned up with a warning.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from fd_onestep.errors import RunError
from fd_onestep.training.checkpoints import SUPERSEDED_DIR, list_checkpoints, list_partial_checkpoints

logger = logging.getLogger(__name__)

__all__ = ["LOCK_FILE", "OutputDirLock", "check_no_overwrite", "clear_previous_run", "honour_umask"]

LOCK_FILE = ".fd_onestep.lock"


def check_no_overwrite(output_dir: str | os.PathLike, resuming: bool, overwrite: bool) -> None:
    """Refuse a new run (no resume) in a folder holding checkpoints, unless ``overwrite``; name both ways on."""
    if resuming or overwrite:
        return
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        raise RunError(
            f"--output_dir {str(output_dir)!r} holds checkpoints of a run ({', '.join(p.name for p in checkpoints)}) "
            "and this command would start a new run over them. Continue that run with --resume_from_checkpoint "
            "latest, start over with --overwrite_output_dir (deletes its checkpoints), or pick another --output_dir."
        )


def clear_previous_run(output_dir: str | os.PathLike, run_files=()) -> list[Path]:
    """``--overwrite_output_dir``: delete the earlier run's checkpoints (complete, partial and superseded), ``best/``
    and ``run_files`` (names in the folder); return what was deleted. The rest is overwritten as the run writes it."""
    root = Path(output_dir)
    removed = []
    for path in [*list_checkpoints(root), *list_partial_checkpoints(root), root / "best", root / SUPERSEDED_DIR,
                 *(root / name for name in run_files)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    if removed:
        logger.warning("--overwrite_output_dir: deleted the earlier run's %s", ", ".join(p.name for p in removed))
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(folder: str | os.PathLike) -> int:
    """Give the files under ``folder`` that were written with mode 0600 (safetensors' own file creation, which
    ``save_pretrained`` and the checkpoints use) the mode a plain ``open()`` gives: 0666 minus the umask.
    Returns how many files changed."""
    mode = 0o666 & ~_umask()
    changed = 0
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) == 0o600 and mode != 0o600:
            path.chmod(mode)
            changed += 1
    return changed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class OutputDirLock:
    """``<output_dir>/.fd_onestep.lock``, taken by the run's main process only (created atomically)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: a half-written lock; treated as held by an unknown process

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunError` naming the live run that holds it.

        A lock whose process no longer runs on this host (a crash, a kill -9) is stale: removed, with a warning.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released in between
                pid, host = owner.get("pid"), owner.get("host")
                if host == me["host"] and pid == me["pid"]:
                    break  # this process's own lock (an earlier run in the same interpreter)
                if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    logger.warning("Removing the stale lock %s of a run that no longer runs (PID %s, since %s).",
                                   self.path, pid, owner.get("since", "?"))
                    self.path.unlink(missing_ok=True)
                    continue
                where = f"PID {pid} on {host}" if pid else "an unknown process"
                raise RunError(
                    f"--output_dir {str(self.path.parent)!r} is in use by another run ({where}, since "
                    f"{owner.get('since', '?')}): two runs in one folder would overwrite each other's checkpoints. "
                    f"Wait for it to end, use another --output_dir, or, if no such run is alive, delete {self.path}."
                )
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                break
        else:
            raise RunError(f"could not take the lock {self.path}; delete it if no run is using that folder.")
        self.held = True
        atexit.register(self.release)

    def release(self) -> None:
        """Remove the lock if this process holds it (also at interpreter exit)."""
        if not self.held:
            return
        self.held = False
        owner = self._owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
