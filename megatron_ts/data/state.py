"""The loader state saved with every checkpoint (plain JSON-able data, one per DP rank).

Layout (`format` = "megatron_ts.loader/2"):

    {
      "format": "megatron_ts.loader/2",
      "seed": 1234, "stage": 1, "stage_name": "1024px",
      "sources": ["s3://bucket/laion/", ...],   # [] for the synthetic source
      "synthetic": false, "streams": 64,        # C lanes (canonical streams per source)
      "dp_rank": 3, "dp_size": 64, "num_workers": 4, "micro_batch": 8,
      "start": 0,                               # global position of this layout's batch 0
      "batches": 1200,                          # micro-batches handed to the trainer since
      "consumed": 614400,                       # start + batches * dp_size * micro_batch
      "workers": [                              # one per logical worker, in worker order
        {"lanes": [[lane, n, [count per source]], ...],
         "readers": [[source, lane, index, epoch, group, offset], ...],
         "seen": 2410, "skipped": 1, "missing_shards": 0,
         "bytes_read": 123456789, "retries": 2},
        ...
      ]
    }

`consumed` is the number of samples the whole run took in this stage (every rank agrees at an
optimizer-step boundary). Per worker, a lane entry says that lane positions [0, n) of lane c
hold counts[s] samples of source s; a reader entry that the next sample stream (source, lane)
emits is number `index`, at cursor (epoch, group, offset). Every entry is the worker's position
after the last micro-batch the trainer took (batches prefetched but not consumed are produced
again after a resume).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

from megatron_ts.errors import EXIT_DATA

STATE_FORMAT = "megatron_ts.loader/2"


class LoaderStateError(ValueError):
    """A saved loader state that does not fit this loader; the message says what to change."""

    exit_code = EXIT_DATA


@dataclass
class WorkerState:
    """Position and counters of one logical worker."""

    lanes: list[list] = field(default_factory=list)
    """Per lane it reads: [lane, n, [count per source]] (see the module docstring)."""
    readers: list[list[int]] = field(default_factory=list)
    """Per stream it reads: [source, lane, index, epoch, group, offset]."""
    seen: int = 0
    """Samples read, including corrupt ones and ones read past for other ranks."""
    skipped: int = 0
    """Corrupt samples skipped (missing shards count their manifest samples)."""
    missing_shards: int = 0
    """Shards that did not exist when opened."""
    bytes_read: int = 0
    """Shard bytes read."""
    retries: int = 0
    """S3 requests retried."""

    COUNTERS: ClassVar[tuple[str, ...]] = (
        "seen",
        "skipped",
        "missing_shards",
        "bytes_read",
        "retries",
    )
    """The fields above that are statistics (summed over workers), not positions."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WorkerState:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["lanes"] = [
            [int(c), int(n), [int(x) for x in counts]] for c, n, counts in known.get("lanes", [])
        ]
        known["readers"] = [[int(x) for x in r] for r in known.get("readers", [])]
        return cls(**known)
