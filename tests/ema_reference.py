"""The weight average as it was before it was partitioned over DP ranks (commit aa06587): a full
fp32 copy per rank, each parameter converted whole. The tests hold the partitioned
`megatron_ts.training.ema.WeightAverage` to its numbers, bit for bit. Only `swapped` gained the
(ignored) `to_rank` argument that the checkpoint code now passes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


class ReferenceAverage:
    """The moving average of the parameters of a rank's layer modules."""

    def __init__(self, modules: Mapping[int, nn.Module], decay: float):
        """
        Args:
            modules: {layer index: layer module} of this rank (`StageEngine.local_layers`).
            decay: weight of the previous average in each update, 0 < decay < 1.
        """
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay {decay}; use 0 < decay < 1")
        self.decay = decay
        self.params = [p for _, m in sorted(modules.items()) for p in m.parameters()]
        self.average = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def capture(self) -> None:
        """Restarts the average at the current weights (a stage start or a loaded average)."""
        for avg, p in zip(self.average, self.params, strict=True):
            avg.copy_(p)
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Folds the current weights in; call after each optimizer step that changed them."""
        for avg, p in zip(self.average, self.params, strict=True):
            avg.lerp_(p.float(), 1.0 - self.decay)
        self.updates += 1

    @contextmanager
    def swapped(self, to_rank: int | None = None) -> Iterator[None]:  # to_rank: today's call
        """Inside the block the parameters hold the average (to write or sample it); the trained
        weights are kept on the CPU meanwhile and put back exactly afterwards."""
        kept = []
        with torch.no_grad():
            for avg, p in zip(self.average, self.params, strict=True):
                kept.append(p.detach().to("cpu", copy=True))
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, p in zip(kept, self.params, strict=True):
                    p.copy_(saved)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.average)
