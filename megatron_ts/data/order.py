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

With aspect-ratio buckets each (source, bucket) pair is a sub-source with its own streams (a
source's shards each hold one bucket), and the draw has two levels (`Mixture`): the bucket of a
position is drawn once per optimizer step, from hash(seed, stage, p // B) with B the global batch,
weighted by the samples each bucket has; the sub-source is then drawn from hash(seed, stage, p)
among that bucket's. Every position of a step, so every micro-batch of every rank, holds one
bucket, whatever the DP size (a resume point is always a multiple of B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_ts.data.sources import TAG_BUCKET, TAG_MIX

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_COUNT_BLOCK = 1 << 20
_TAKE_BLOCK = 1024


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(seed: int, stage: int, tag: int = TAG_MIX) -> np.uint64:
    k = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    k = _mix64(k ^ np.uint64((stage << 8 | tag) & 0xFFFFFFFFFFFFFFFF))
    return k[0]


def _uniform(counter: np.ndarray, key: np.uint64) -> np.ndarray:
    """A uniform draw in [0, 1) per uint64 counter, keyed."""
    with np.errstate(over="ignore"):
        x = _mix64(counter * np.uint64(0x9E3779B97F4A7C15) + key)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


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
    return _pick(weights, _uniform(pos, _key(seed, stage)))


def _pick(weights, u: np.ndarray) -> np.ndarray:
    """Index i with probability weights[i] / sum for each uniform u."""
    cum = np.cumsum(np.asarray(weights, dtype=np.float64))
    return np.minimum(np.searchsorted(cum / cum[-1], u, side="right"), len(weights) - 1)


@dataclass(frozen=True)
class Mixture:
    """How positions are dealt to (sub-)sources: by weight, and with buckets a bucket per step.

    Without buckets (`groups` empty) this is `source_draws`, unchanged. With them, sub-source j
    belongs to bucket groups[j]; the bucket of position p is drawn from hash(seed, stage, p //
    step) with each bucket weighted by its sub-sources' summed weight, then the sub-source from
    hash(seed, stage, p) among that bucket's, by weight.
    """

    weights: tuple[float, ...]
    """Weight of each sub-source."""
    groups: tuple[int, ...] = ()
    """Bucket index of each sub-source; empty: no buckets."""
    step: int = 1
    """Positions per optimizer step (the stage's global batch): the span that shares a bucket."""

    def draws(self, positions: np.ndarray, seed: int, stage: int) -> np.ndarray:
        """The sub-source of every position (int64, the shape of `positions`)."""
        if not self.groups:
            return source_draws(positions, self.weights, seed, stage)
        pos = np.asarray(positions, dtype=np.uint64)
        buckets = sorted(set(self.groups))
        members = {b: [j for j, g in enumerate(self.groups) if g == b] for b in buckets}
        bucket_weights = [sum(self.weights[j] for j in members[b]) for b in buckets]
        steps = pos // np.uint64(self.step)
        chosen = _pick(bucket_weights, _uniform(steps, _key(seed, stage, TAG_BUCKET)))
        u = _uniform(pos, _key(seed, stage))
        out = np.empty(pos.shape, dtype=np.int64)
        for i, b in enumerate(buckets):
            here = chosen == i
            mine = members[b]
            out[here] = np.asarray(mine)[_pick([self.weights[j] for j in mine], u[here])]
        return out

    def bucket_of(self, position: int, seed: int, stage: int) -> int:
        """The bucket index of `position` (0 without buckets)."""
        if not self.groups:
            return 0
        return self.groups[int(self.draws(np.array([position]), seed, stage)[0])]


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
        weights: tuple[float, ...] | Mixture,
        seed: int,
        stage: int,
        n: int = 0,
        counts: list[int] | None = None,
    ):
        self.mixture = weights if isinstance(weights, Mixture) else Mixture(tuple(weights))
        self.lane, self.lanes, self.weights = lane, lanes, self.mixture.weights
        self.seed, self.stage = seed, stage
        self.n = n
        self.counts = list(counts) if counts is not None else [0] * len(self.weights)
        self._block = -1
        self._block_draws = np.zeros(0, dtype=np.int64)

    def _draws(self, lo: int, hi: int) -> np.ndarray:
        pos = self.lane + self.lanes * np.arange(lo, hi, dtype=np.uint64)
        return self.mixture.draws(pos, self.seed, self.stage)

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
