"""An exponential moving average of the weights (`train.ema_decay`), partitioned over DP ranks.

After every optimizer step the average folds in the parameters: `avg <- decay * avg +
(1 - decay) * w`, in fp32. The parameters of a rank are its tensor-parallel shards of its
pipeline stage's layers; every data-parallel rank holds the same ones, so the average is split
among them like ZeRO-1 splits the optimizer state: the local parameters are read as one flat
vector of N elements, DP rank r owns elements [r * S, (r + 1) * S) with S = ceil(N / DP), and
keeps the fp32 average of that slice only (4 * S bytes instead of 4 * N; about 5.3 GB instead
of 10.6 GB per GPU at 2.7B with TP = 1 and DP = 2). The update works in place on the slice;
bf16 parameters are converted to fp32 in chunks of `CHUNK` elements, never a whole parameter.

The full average exists only inside `swapped()`: the slices are all-gathered over the
data-parallel group, chunk by chunk, straight into the parameters (a collective: every DP rank
enters it). Checkpoints write the average from there as `model_ema/` layer files beside `model/`
(same format as the weights, so any TP/PP/DP layout reads any other's); reading one back loads it
into the parameters and `capture()` keeps the owned slice. ZeRO-3 (parameters partitioned over
data-parallel ranks) is not supported: `validate` refuses the combination.

The average starts from the weights a stage begins with. A resume in the middle of a stage
restores it, the next curriculum stage trains on the raw weights and starts a fresh average,
and `ts-convert to-hf` exports the average when there is one.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

CHUNK = 1 << 24
"""Elements converted or gathered at a time: 64 MiB of fp32 per chunk (times DP when gathered)."""

_DATA_PARALLEL = object()


def _data_parallel_group() -> dist.ProcessGroup | None:
    """megatron-core's data-parallel group when it is set up, else None (no partition)."""
    from megatron.core import parallel_state

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None
    return parallel_state.get_data_parallel_group()


class WeightAverage:
    """The moving average of this DP rank's slice of a rank's layer-module parameters."""

    def __init__(
        self,
        modules: Mapping[int, nn.Module],
        decay: float,
        group: dist.ProcessGroup | None | object = _DATA_PARALLEL,
    ):
        """
        Args:
            modules: {layer index: layer module} of this rank (`StageEngine.local_layers`).
            decay: weight of the previous average in each update, 0 < decay < 1.
            group: the ranks that hold the same parameters and share the average; by default
                megatron-core's data-parallel group (none when model parallelism is not set up).
                None keeps the whole average on this rank.
        """
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay {decay}; use 0 < decay < 1")
        self.decay = decay
        self.params = [p for _, m in sorted(modules.items()) for p in m.parameters()]
        self.group = _data_parallel_group() if group is _DATA_PARALLEL else group
        self.world = dist.get_world_size(self.group) if self.group is not None else 1
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        self.offsets = [0]  # flat offset of each parameter, then the total
        for p in self.params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.numel = self.offsets[-1]
        self.shard = -(-self.numel // self.world)  # S; the last slice is zero-padded to it
        self.start = min(self.rank * self.shard, self.numel)
        device = self.params[0].device if self.params else torch.device("cpu")
        # (S,) fp32: elements [start, start + S) of the flattened parameters
        self.average = torch.zeros(self.shard, dtype=torch.float32, device=device)
        self.capture()

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this rank keeps for the average."""
        return self.average.numel() * self.average.element_size()

    def _pieces(self, lo: int, hi: int) -> Iterator[tuple[torch.Tensor, int, int]]:
        """(flat parameter view, flat start, flat stop) of each parameter's part in [lo, hi)."""
        i = bisect.bisect_right(self.offsets, lo) - 1
        while i < len(self.params) and self.offsets[i] < hi:
            off = self.offsets[i]
            a, b = max(lo, off), min(hi, self.offsets[i + 1])
            if b > a:
                yield self.params[i].detach().view(-1)[a - off : b - off], a, b
            i += 1

    def _owned(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(average chunk, parameter chunk) pairs covering this rank's slice, CHUNK at most."""
        stop = min(self.start + self.shard, self.numel)
        for w, a, b in self._pieces(self.start, stop):
            for c in range(0, b - a, CHUNK):
                at = a - self.start + c
                n = min(CHUNK, b - a - c)
                yield self.average[at : at + n], w[c : c + n]

    @torch.no_grad()
    def capture(self) -> None:
        """Restarts the average at the current weights (a stage start or a loaded average)."""
        for avg, w in self._owned():
            avg.copy_(w)
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Folds the current weights in; call after each optimizer step that changed them."""
        weight = 1.0 - self.decay
        for avg, w in self._owned():
            avg.lerp_(w if w.dtype == torch.float32 else w.float(), weight)
        self.updates += 1

    @torch.no_grad()
    def _write_full(self, receive: bool) -> None:
        """Writes the whole average into the parameters when `receive` (collective: every rank
        of the group sends its slice)."""
        if self.world == 1:
            for avg, w in self._owned():
                w.copy_(avg)
            return
        step = max(1, CHUNK // self.world)
        for c in range(0, self.shard, step):
            n = min(step, self.shard - c)
            parts = [torch.empty_like(self.average[:n]) for _ in range(self.world)]
            dist.all_gather(parts, self.average[c : c + n].contiguous(), group=self.group)
            if not receive:
                continue
            for r, part in enumerate(parts):
                lo = r * self.shard + c  # flat position of part[0]
                for w, a, b in self._pieces(lo, min(lo + n, self.numel)):
                    w.copy_(part[a - lo : b - lo])

    @contextmanager
    def swapped(self, to_rank: int | None = None) -> Iterator[None]:
        """Inside the block the parameters hold the average (to write or sample it); the trained
        weights are kept on the CPU meanwhile and put back exactly afterwards.

        Collective over the data-parallel group: every DP rank enters it. With `to_rank`, only
        that DP rank's parameters receive the average (the others only send their slices, and
        keep no copy), as a checkpoint save that one rank writes needs.
        """
        receive = to_rank is None or to_rank == self.rank
        kept = []
        if receive:
            with torch.no_grad():
                for p in self.params:
                    kept.append(p.detach().to("cpu", copy=True))
        try:
            self._write_full(receive)
            yield
        finally:
            with torch.no_grad():
                for saved, p in zip(kept, self.params if receive else [], strict=True):
                    p.copy_(saved)
