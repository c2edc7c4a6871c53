"""Fixed-shape micro-batches and deterministic caption dropout.

For caption length C and grid G a batch of B samples is

    text      int64   [B, C+2]  <bos>, caption ids truncated to C, <pad> up to C+1, <boi> at C+1
    text_mask float32 [B, C+2]  1.0 on real caption tokens (not bos/pad/boi), else 0.0
    codes     int64   [B, G, G] codebook-local codes
    dropped   bool    [B]       caption dropout applied (caption replaced by pads, mask all 0)
    keys      list[str]         sample keys, for error messages

Caption dropout (classifier-free guidance) is decided by a hash of (seed, stage, source, epoch,
key), not by an RNG stream, so a resumed run drops exactly the same captions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from megatron_ts.data.pipeline import Sample


def dropout_draw(seed: int, stage: int, source: int, epoch: int, key: str) -> float:
    """A uniform number in [0, 1) that depends only on its arguments."""
    digest = hashlib.blake2b(
        f"{seed}/{stage}/{source}/{epoch}/{key}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") / 2.0**64


@dataclass(frozen=True)
class Collator:
    """Turns a list of samples into one fixed-shape batch."""

    caption_len: int
    grid: int
    bos_id: int
    pad_id: int
    boi_id: int
    caption_dropout: float
    seed: int
    stage: int

    def __call__(self, samples: list[Sample]) -> dict:
        b, c, g = len(samples), self.caption_len, self.grid
        text = np.full((b, c + 2), self.pad_id, dtype=np.int64)
        text[:, 0] = self.bos_id
        text[:, c + 1] = self.boi_id
        mask = np.zeros((b, c + 2), dtype=np.float32)
        codes = np.empty((b, g, g), dtype=np.int64)
        dropped = np.zeros(b, dtype=bool)
        for i, s in enumerate(samples):
            codes[i] = s.codes  # (G, G) uint16 -> int64
            if self.caption_dropout > 0 and (
                dropout_draw(self.seed, self.stage, s.source, s.epoch, s.key) < self.caption_dropout
            ):
                dropped[i] = True
                continue
            n = min(len(s.ids), c)
            text[i, 1 : 1 + n] = s.ids[:n]
            mask[i, 1 : 1 + n] = 1.0
        return {
            "text": torch.from_numpy(text),
            "text_mask": torch.from_numpy(mask),
            "codes": torch.from_numpy(codes),
            "keys": [s.key for s in samples],
            "dropped": torch.from_numpy(dropped),
        }
