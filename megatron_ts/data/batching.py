"""Fixed-shape micro-batches and deterministic caption dropout.

For caption length C and grid G a batch of B samples is

    text      int64   [B, C+2]  <bos>, caption ids truncated to C, <pad> up to C+1, <boi> at C+1
    text_mask float32 [B, C+2]  1.0 on real caption tokens (not bos/pad/boi), else 0.0
    codes     int64   [B, G, G] codebook-local codes
    dropped   bool    [B]       caption dropout applied (caption replaced by pads, mask all 0)
    keys      list[str]         sample keys, for error messages

The text span comes from `SequenceLayout.prompts` (megatron_ts/sequence.py), the one definition
of the prompt format. Caption dropout (classifier-free guidance) is decided by a hash
of (seed, stage, source, epoch, key), not by an RNG stream, so a resumed run drops exactly the
same captions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from megatron_ts.data.pipeline import Sample
from megatron_ts.sequence import SequenceLayout
from megatron_ts.vocab import VocabLayout


def dropout_draw(seed: int, stage: int, source: int, epoch: int, key: str) -> float:
    """A uniform number in [0, 1) that depends only on its arguments."""
    digest = hashlib.blake2b(
        f"{seed}/{stage}/{source}/{epoch}/{key}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") / 2.0**64


@dataclass(frozen=True)
class Collator:
    """Turns a list of samples into one fixed-shape batch."""

    layout: SequenceLayout
    """Caption length, grid and prompt format of the stage."""
    vocab: VocabLayout
    """The special ids of the prompt."""
    caption_dropout: float
    seed: int
    stage: int

    def __call__(self, samples: list[Sample]) -> dict:
        b = len(samples)
        shapes = {s.codes.shape for s in samples}
        if len(shapes) > 1:  # the loader draws one bucket per step; a mix is a bug, not data
            raise RuntimeError(f"a micro-batch mixes code grids {sorted(shapes)}")
        codes = np.empty((b, *shapes.pop()), dtype=np.int64)
        dropped = np.zeros(b, dtype=bool)
        for i, s in enumerate(samples):
            codes[i] = s.codes  # (H, W) uint16 -> int64
            dropped[i] = self.caption_dropout > 0 and (
                dropout_draw(self.seed, self.stage, s.source, s.epoch, s.key) < self.caption_dropout
            )
        # a dropped caption is the empty one: <bos> <pad> x C <boi>, mask all 0
        text, mask = self.layout.prompts(
            [s.ids[:0] if drop else s.ids for s, drop in zip(samples, dropped)], self.vocab
        )
        return {
            "text": torch.from_numpy(text),
            "text_mask": torch.from_numpy(mask),
            "codes": torch.from_numpy(codes),
            "keys": [s.key for s in samples],
            "dropped": torch.from_numpy(dropped),
        }
