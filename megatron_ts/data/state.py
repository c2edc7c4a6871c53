"""The loader state saved with every checkpoint (plain JSON-able data, one per DP rank).

Layout (`format` = "megatron_ts.loader/1"):

    {
      "format": "megatron_ts.loader/1",
      "seed": 1234, "stage": 1, "stage_name": "1024px",
      "dp_rank": 3, "dp_size": 64, "num_workers": 4, "micro_batch": 8,
      "sources": ["s3://bucket/laion/", ...],   # [] for the synthetic source
      "synthetic": false,
      "batches": 1200,                          # micro-batches handed to the trainer
      "workers": [                              # one per logical worker, in worker order
        {"samples": 2400,                       # samples this worker has emitted (mix position)
         "cursors": [[epoch, window, offset], ...],   # per source: where its stream resumes
         "seen": 2410, "skipped": 1, "missing_shards": 0,
         "bytes_read": 123456789, "retries": 2},
        ...
      ]
    }

Micro-batch i of a rank comes from worker i % num_workers, so `batches` says which worker
delivers next, and each worker's entry is its position after the last batch the trainer took
from it (batches prefetched but not consumed are produced again after a resume).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from megatron_ts.errors import EXIT_DATA

STATE_FORMAT = "megatron_ts.loader/1"


class LoaderStateError(ValueError):
    """A saved loader state that does not fit this loader; the message says what to change."""

    exit_code = EXIT_DATA


@dataclass
class WorkerState:
    """Position and counters of one logical worker."""

    samples: int = 0
    """Samples emitted (the position in the seeded source-mixing sequence)."""
    cursors: list[list[int]] = field(default_factory=list)
    """Per source: [epoch, window, offset] where its stream resumes."""
    seen: int = 0
    """Samples read, including corrupt ones."""
    skipped: int = 0
    """Corrupt samples skipped (missing shards count their manifest samples)."""
    missing_shards: int = 0
    """Shards that did not exist when opened."""
    bytes_read: int = 0
    """Shard bytes read."""
    retries: int = 0
    """S3 requests retried."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WorkerState:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["cursors"] = [list(map(int, c)) for c in known.get("cursors", [])]
        return cls(**known)

    @classmethod
    def fresh(cls, num_sources: int) -> WorkerState:
        return cls(cursors=[[0, 0, 0] for _ in range(num_sources)])
