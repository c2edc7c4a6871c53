"""One rank-aware logger for the whole package.

Library code calls `get_logger(__name__)`. Records are emitted on global rank 0 only unless
`all_ranks=True` is passed to `setup_logging` (useful when debugging hangs) or the record is a
warning or worse, which every rank reports with its rank prefix.
"""

from __future__ import annotations

import logging
import os
import sys

_ROOT = "megatron_ts"
_configured = False


def _global_rank() -> int:
    # torch.distributed may not be initialised yet; launchers export RANK / SLURM_PROCID first.
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class _RankFilter(logging.Filter):
    def __init__(self, all_ranks: bool):
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        rank = _global_rank()
        record.rank = rank
        return self.all_ranks or rank == 0 or record.levelno >= logging.WARNING


def setup_logging(level: str = "INFO", all_ranks: bool = False) -> None:
    """Configures the package logger once: stream to stderr with the rank in every line.

    Args:
        level: logging level name.
        all_ranks: emit INFO records from every rank, not only rank 0.
    """
    global _configured
    root = logging.getLogger(_ROOT)
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s [rank%(rank)s] %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(_RankFilter(all_ranks))
    root.addHandler(handler)
    root.propagate = False
    _configured = True


def get_logger(name: str) -> logging.Logger:
    """Returns a logger under the package root, configuring defaults on first use."""
    if not _configured:
        setup_logging(os.environ.get("TS_LOG_LEVEL", "INFO"))
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)
