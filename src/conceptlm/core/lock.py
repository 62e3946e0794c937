"""An exclusive lock on a run folder while a run writes it.

The lock is an ``flock`` on ``<run_dir>/.lock``: the kernel releases it when the holder exits in any way (also
SIGKILL), so a lock left by a killed run is never in the way; the file keeps the holder's pid, host and start time
so that a refused second run can say who holds it, and a taken-over stale lock is reported.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from conceptlm.core.errors import RunLockedError

__all__ = ["RunLock"]

log = logging.getLogger(__name__)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking
    fcntl = None


class RunLock:
    """``with RunLock(run_dir): ...`` or ``lock.acquire()`` / ``lock.release()``.

    Raises:
        RunLockedError: another live process holds the lock (the message names its pid, host and start time).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None or fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                   if holder else "another process")
            raise RunLockedError(f"{self.path.parent}: the run folder is in use by {who}; wait for that run to "
                                 "finish, or choose another run.name") from None
        stale = _read(fd)
        if stale:
            log.warning("%s: taking over the lock left by pid %s on %s (that run was killed)", self.path.parent,
                        stale.get("pid"), stale.get("host"))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file: released cleanly, not stale
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
