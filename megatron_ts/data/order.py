"""The global sample order of a stage, independent of the DP size, micro-batch and workers.

Positions p = 0, 1, 2, ... number the samples of a stage in the order optimizer steps consume
them: step t (after a resume at position P: the t-th step since) takes [P + t*B, P + (t+1)*B).
Every position is fixed by (seed, stage) and the data:

    source(p) = a counter-based weighted draw from hash(seed, stage, p)
    lane(p)   = p mod C                     (C = data.streams lanes)
    index(p)  = #{q < p : lane(q) = lane(p), source(q) = source(p)}

and the sample at p is sample number index(p) of the canonical stream (source(p), lane(p))
(`pipeline.SourceStream`). A layout only decides who reads which position:

    rank r's micro-batch k = positions P + k*dp*mb + j*dp + r, j in [0, mb)
    the lanes a rank touches are owned by its workers: owner(c) = (c // gcd(dp, C)) mod W

so a lane is read by dp / gcd(dp, C) ranks (1 when dp divides C) and by one worker per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_ts.data.sources import TAG_MIX

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_COUNT_BLOCK = 1 << 20
_TAKE_BLOCK = 1024


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(seed: int, stage: int) -> np.uint64:
    k = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    k = _mix64(k ^ np.uint64((stage << 8 | TAG_MIX) & 0xFFFFFFFFFFFFFFFF))
    return k[0]


def source_draws(
    positions: np.ndarray, weights: tuple[float, ...], seed: int, stage: int
) -> np.ndarray:
    """The source index of every position: a function of (seed, stage, weights, p) only.

    Args:
        positions: global positions (any shape, non-negative integers).
        weights: mixing weights of the stage's sources (> 0).
        seed: run seed.
        stage: stage index.

    Returns:
        int64 array of source indices, same shape as `positions`.
    """
    pos = np.asarray(positions, dtype=np.uint64)
    if len(weights) == 1:
        return np.zeros(pos.shape, dtype=np.int64)
    with np.errstate(over="ignore"):
        x = _mix64(pos * np.uint64(0x9E3779B97F4A7C15) + _key(seed, stage))
    u = (x >> np.uint64(11)).astype(np.float64) * 2.0**-53  # uniform in [0, 1)
    cum = np.cumsum(np.asarray(weights, dtype=np.float64))
    return np.minimum(np.searchsorted(cum / cum[-1], u, side="right"), len(weights) - 1)


@dataclass(frozen=True)
class Layout:
    """Who reads which position: DP size and rank, micro-batch, workers, lanes, resume point."""

    dp_rank: int
    dp_size: int
    micro_batch: int
    num_workers: int
    lanes: int
    start: int
    """Position of this layout's micro-batch 0 (the resume point; 0 at the stage start)."""

    def position(self, batch: int, j: int) -> int:
        """Global position of sample j of this rank's micro-batch `batch`."""
        return (
            self.start + batch * self.dp_size * self.micro_batch + j * self.dp_size + self.dp_rank
        )

    @property
    def group(self) -> int:
        """gcd(dp, C): ranks whose positions fall in the same lanes form residue classes mod it."""
        return math.gcd(self.dp_size, self.lanes)

    def owner(self, lane: int) -> int:
        """The worker of this rank that reads `lane`."""
        return (lane // self.group) % self.num_workers

    def rank_lanes(self) -> list[int]:
        """Lanes holding positions of this rank (every lane c = (start + r) mod gcd(dp, C))."""
        g = self.group
        first = (self.start + self.dp_rank) % g
        return list(range(first, self.lanes, g))

    def worker_lanes(self, worker: int) -> list[int]:
        return [c for c in self.rank_lanes() if self.owner(c) == worker]

    @property
    def read_amplification(self) -> int:
        """How many ranks read each lane: samples read over samples used (1 when dp | C)."""
        return self.dp_size // self.group


def lane_positions_before(position: int, lane: int, lanes: int) -> int:
    """#{q < position : q mod lanes = lane}: the lane position index of `position`."""
    return max(0, -(-(position - lane) // lanes))


class LaneCounter:
    """Counts, along lane c (positions c, c + C, c + 2C, ...), how many went to each source.

    The state (n, counts) means: lane positions [0, n) hold counts[s] positions of source s, so
    the next sample of stream (s, c) is number counts[s].
    """

    def __init__(
        self,
        lane: int,
        lanes: int,
        weights: tuple[float, ...],
        seed: int,
        stage: int,
        n: int = 0,
        counts: list[int] | None = None,
    ):
        self.lane, self.lanes, self.weights = lane, lanes, weights
        self.seed, self.stage = seed, stage
        self.n = n
        self.counts = list(counts) if counts is not None else [0] * len(weights)
        self._block = -1
        self._block_draws = np.zeros(0, dtype=np.int64)

    def _draws(self, lo: int, hi: int) -> np.ndarray:
        pos = self.lane + self.lanes * np.arange(lo, hi, dtype=np.uint64)
        return source_draws(pos, self.weights, self.seed, self.stage)

    def advance(self, n: int) -> None:
        """Accounts lane positions [self.n, n)."""
        if n < self.n:
            raise ValueError(f"lane {self.lane}: cannot go back from {self.n} to {n}")
        if len(self.weights) == 1:
            self.counts[0] += n - self.n
            self.n = n
            return
        for lo in range(self.n, n, _COUNT_BLOCK):
            hi = min(n, lo + _COUNT_BLOCK)
            got = np.bincount(self._draws(lo, hi), minlength=len(self.weights))
            self.counts = [a + int(b) for a, b in zip(self.counts, got)]
        self.n = n

    def _draw(self, n: int) -> int:
        # Draws come in blocks: one numpy call per sample would cost more than reading it.
        block = n // _TAKE_BLOCK
        if block != self._block:
            self._block = block
            self._block_draws = self._draws(block * _TAKE_BLOCK, (block + 1) * _TAKE_BLOCK)
        return int(self._block_draws[n - block * _TAKE_BLOCK])

    def take(self, position: int) -> tuple[int, int]:
        """(source, index in that source's stream) of `position`, which must lie on this lane."""
        n = (position - self.lane) // self.lanes
        self.advance(n)
        src = self._draw(n) if len(self.weights) > 1 else 0
        index = self.counts[src]
        self.counts[src] += 1
        self.n = n + 1
        return src, index

    def entry(self) -> list:
        return [self.lane, self.n, list(self.counts)]
