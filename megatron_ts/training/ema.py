"""An exponential moving average of the weights (`train.ema_decay`).

After every optimizer step each rank folds the parameters it holds into an fp32 average:
`avg <- decay * avg + (1 - decay) * w`. "The parameters it holds" are its tensor-parallel shards
of its pipeline stage's layers, so the average is sharded like the weights and costs 4 bytes per
local parameter. ZeRO-3 (parameters partitioned over data-parallel ranks) is not supported:
`validate` refuses the combination.

The average starts from the weights a stage begins with. Checkpoints write it as `model_ema/`
layer files beside `model/` (same format, so any TP/PP layout can read it back); a resume in
the middle of a stage restores it, the next curriculum stage trains on the raw weights and
starts a fresh average, and `ts-convert to-hf` exports the average when there is one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
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
    def swapped(self) -> Iterator[None]:
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
