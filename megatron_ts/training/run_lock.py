"""One trainer per run directory: an exclusive lock held by rank 0 for the life of the process.

Two `ts-train` processes on one run directory would delete each other's half-written saves
(every start removes `.tmp-*` leftovers) and move `latest` back and forth. Rank 0 takes an
`flock` on `RUN_DIR/.ts-train.lock` before anything else touches the directory; the kernel
releases it when the process ends, however it ends (`kill -9` included), so there is no stale
lock to clean up. The file holds the holder's host, pid and start time for the message.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from megatron_ts.errors import EXIT_USAGE
from megatron_ts.logging import get_logger

log = get_logger(__name__)

LOCK_FILE = ".ts-train.lock"


class RunDirBusyError(RuntimeError):
    """Another trainer holds the run directory."""

    exit_code = EXIT_USAGE


class RunLock:
    """The lock of one run directory; `acquire` once, keep the object alive while training."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Takes the lock; returns None, or a description of the process that holds it.

        File systems without flock support (ENOLCK, EOPNOTSUPP) run unlocked, with a warning.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = os.read(fd, 4096).decode("utf-8", "replace")
                os.close(fd)
                return self._describe(holder)
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning(
                    "%s: the file system has no flock; the run directory is not locked", self.path
                )
                return None
            raise
        os.ftruncate(fd, 0)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        self._fd = fd  # held open for the life of the process: closing it drops the lock
        return None

    def _describe(self, holder: str) -> str:
        try:
            rec = json.loads(holder)
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["started"]))
            who = f"pid {rec['pid']} on {rec['host']}, since {since}"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        return (
            f"run directory in use by another ts-train ({self.path.parent}: {who}): wait for it "
            "to end or stop it, or give this run another job.run_dir"
        )
