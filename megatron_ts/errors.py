"""One error contract for every command-line tool.

A known failure ends the tool with one line on stderr, `<tool>: <what> (<where>): <what to do>`,
and the exit code of its class below; no traceback. Anything else is a bug or an unforeseen
environment problem and keeps Python's traceback (exit 1), so it can be reported.

| code | class | examples |
|---|---|---|
| 0 | success | |
| 1 | unexpected | a traceback: a bug, or a failure nobody has classified yet |
| 2 | config / usage | bad flag or config value, a named input that does not exist, not an export |
| 3 | data | corrupt or changed shards past `data.max_error_rate`, bad manifest, inputs failed |
| 4 | storage | disk full, read-only or permission denied, S3 credentials or access, retries exhausted |
| 5 | checkpoint | a checkpoint missing, truncated, damaged or from an incompatible run |
| 6 | diverged | `train.max_nonfinite_in_row` non-finite steps in a row |
| 75 | requeue | checkpointed after SIGTERM / SIGUSR1 (EX_TEMPFAIL) |
| 130 | interrupted | Ctrl-C |

Exception classes opt in with a class attribute `exit_code`; OSErrors of a full disk, a read-only
file system and missing permissions are classified here because they come from the platform
rather than from our code, and raw botocore errors through megatron_ts.storage's `fatal_error`.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_STORAGE = 4
EXIT_CHECKPOINT = 5
EXIT_DIVERGED = 6
EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130

_DISK_FIXES = {
    errno.ENOSPC: ("disk full", "free space there (or lower checkpoint.keep_last) and run again"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota, and run again"),
    errno.EROFS: ("read-only file system", "point the output at a writable directory"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another directory"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another directory"),
}


def _one_line(message: str) -> str:
    """The message itself; for an error re-raised from a DataLoader worker, the original one.

    torch re-raises a worker's exception as the same class with the worker's traceback as its
    message ("Caught X in DataLoader worker process 0. Original Traceback ... X: <message>").
    """
    if "Original Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(message.split("\n"))


def classify(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, message) of a known failure, or None for one that keeps its traceback."""
    code = getattr(type(exc), "exit_code", None)
    if isinstance(code, int) and code != EXIT_UNEXPECTED:
        return code, _one_line(str(exc))
    if isinstance(exc, OSError) and exc.errno in _DISK_FIXES:
        what, fix = _DISK_FIXES[exc.errno]
        where = exc.filename or "?"
        return EXIT_STORAGE, f"{what} ({where}): {fix}"
    if type(exc).__module__.startswith("botocore"):
        # our S3 code raises megatron_ts.storage's classified errors; this is a raw one from elsewhere
        from megatron_ts.storage import fatal_error

        fatal = fatal_error(exc, "an S3 URL")
        return None if fatal is None else classify(fatal)
    if isinstance(exc, FileNotFoundError):
        if exc.filename is None:  # raised with a message of our own
            return EXIT_USAGE, _one_line(str(exc))
        return EXIT_USAGE, f"not found ({exc.filename}): check the path or URL"
    return None


def run_cli(tool: str, main: Callable[[], int]) -> int:
    """Runs a tool's `main`, turning known failures into one stderr line and their exit code.

    Args:
        tool: the command name that starts the line (`ts-train`).
        main: the tool body; returns its exit code.

    Returns:
        The exit code; unexpected exceptions propagate with their traceback.
    """
    try:
        return main()
    except KeyboardInterrupt:
        _say(f"{tool}: interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - unknown ones are re-raised below
        known = classify(exc)
        if known is None:
            raise
        code, line = known
        _say(f"{tool}: {line}")
        return code


def _say(line: str) -> None:
    """Writes `line` and its newline to stderr in one write: ranks sharing a stderr pipe
    (torchrun, srun) then cannot splice their lines together, as print's two writes let them."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
