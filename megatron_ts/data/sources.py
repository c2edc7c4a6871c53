"""Token-shard sources: their manifests and the deterministic split of shards over streams.

A source is a directory (local or `s3://bucket/prefix/`) holding `manifest.json` and the tar
shards it lists. A source tokenized with aspect-ratio buckets is split into one sub-source per
bucket (each shard holds one bucket), weighted by the samples each holds. Every (sub-)source is
read as C canonical streams (lanes, `data.streams`), whatever the DP size and worker count. For epoch `e` of source `i` the shards are permuted with an RNG seeded by
(seed, stage, i, e) and dealt round-robin: stream c reads `order[c::C]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_ts.data.manifest import ManifestError, ShardEntry, load_manifest
from megatron_ts.errors import EXIT_DATA
from megatron_ts.logging import get_logger
from megatron_ts.vocab import VocabLayout

logger = get_logger(__name__)

# Tags that keep the RNG streams of different purposes apart.
TAG_SHARDS = 11
TAG_GROUP = 12
TAG_BUFFER = 13
TAG_MIX = 14
TAG_SYNTHETIC = 15
TAG_BUCKET = 16


class DataSourceError(ValueError):
    """A source that cannot be read as configured; the message names the source and the fix."""

    exit_code = EXIT_DATA


@dataclass(frozen=True)
class SourceSpec:
    """One resolved source of a stage."""

    url: str
    """The source directory as configured."""
    weight: float
    """Mixing weight among the stage's sources."""
    base: str
    """URL prefix of the shards (the manifest's directory, ending in "/")."""
    shards: tuple[ShardEntry, ...]
    """Shards listed by the manifest, in manifest order."""
    grid: tuple[int, int]
    """(rows, columns) of every sample's codes."""
    vocab: VocabLayout
    """Vocabulary layout the shards were tokenized with (a required manifest field)."""
    bucket: str | None = None
    """The aspect-ratio bucket all these shards hold; None for a stage without buckets."""

    @property
    def label(self) -> str:
        """The source URL, with the bucket for a sub-source (logs and loader state)."""
        return self.url if self.bucket is None else f"{self.url} [{self.bucket}]"


def read_source(
    url: str,
    weight: float,
    *,
    endpoint_url: str | None = None,
    grid: tuple[int, int] | None = None,
    buckets: dict[str, tuple[int, int]] | None = None,
    buckets_field: str = "the stage's buckets",
) -> list[SourceSpec]:
    """Reads a source's manifest and checks it against the stage.

    Args:
        url: source directory or manifest URL (local or s3://).
        weight: mixing weight.
        endpoint_url: S3 endpoint.
        grid: a stage without buckets: its (rows, columns) of codes; a manifest with another
            grid, or with buckets, is an error.
        buckets: a stage with buckets: {bucket name: (rows, columns)}. A square (unbucketed)
            manifest counts as the stage's bucket of its grid; a bucketed one is split into
            one sub-source per bucket with samples, weighted by its share of the samples. A
            bucket the stage does not list is left out, and logged.
        buckets_field: the config field listing the stage's buckets, for messages.

    Returns:
        One spec (no buckets), or one per bucket in the stage's bucket order.

    Raises:
        DataSourceError: naming the manifest and the field that is wrong.
    """
    try:
        manifest = load_manifest(url, endpoint_url)
    except ManifestError as exc:
        raise DataSourceError(f"source {url}: {exc}") from exc
    if not manifest.shards:
        raise DataSourceError(f"source manifest {manifest.url} lists no shards")
    square = (manifest.grid, manifest.grid)
    base, vocab = manifest.base_url(), manifest.vocab

    def spec(w: float, shards, grid_: tuple[int, int], bucket: str | None) -> SourceSpec:
        return SourceSpec(url, float(w), base, tuple(shards), grid_, vocab, bucket)

    if buckets is None:
        if manifest.buckets is not None:
            names = ", ".join(b.name for b in manifest.buckets)
            raise DataSourceError(
                f"source {url} holds aspect-ratio buckets ({names}) but the stage trains on "
                f"square images; list the buckets to train on in {buckets_field}, or use shards "
                "tokenized without --buckets"
            )
        if grid is not None and square != tuple(grid):
            raise DataSourceError(
                f"source {url} was tokenized at grid {manifest.grid}x{manifest.grid} "
                f"(resolution {manifest.resolution}), but the stage needs grid "
                f"{grid[0]}x{grid[1]}; use shards tokenized at the stage's resolution"
            )
        return [spec(weight, manifest.shards, square, None)]
    if manifest.buckets is None:  # square shards in a bucketed stage: the bucket of their grid
        match = [name for name, g in buckets.items() if tuple(g) == square]
        if not match:
            sizes = ", ".join(f"{n} ({g[0]}x{g[1]} codes)" for n, g in buckets.items())
            raise DataSourceError(
                f"source {url} holds square images of {square[0]}x{square[1]} codes, which no "
                f"bucket of {buckets_field} has ({sizes}); tokenize it with the stage's "
                "--buckets or list a bucket of its size"
            )
        return [spec(weight, manifest.shards, square, match[0])]
    counts = manifest.bucket_samples
    kept = [name for name in buckets if counts.get(name, 0) > 0]
    left_out = {name: n for name, n in counts.items() if n and name not in buckets}
    for name in kept:
        have, need = manifest.bucket_grid(name), tuple(buckets[name])
        if have != need:
            raise DataSourceError(
                f"source {url} bucket {name} has {have[0]}x{have[1]} codes but the stage's "
                f"{name} has {need[0]}x{need[1]} (its size follows resolution, "
                f"tokenizer.downsample and data.grid_multiple = the tokenize run's "
                f"--grid-multiple {manifest.grid_multiple}); make them agree"
            )
    if left_out:
        logger.warning(
            "source %s: %s not in %s, so not trained on",
            url,
            ", ".join(f"bucket {n} ({c} samples)" for n, c in left_out.items()),
            buckets_field,
        )
    if not kept:
        raise DataSourceError(
            f"source {url} holds no samples of the buckets in {buckets_field} "
            f"({', '.join(buckets)}); it has {dict(counts)}"
        )
    total = sum(counts[name] for name in kept)
    return [
        spec(
            weight * counts[name] / total,
            [sh for sh in manifest.shards if sh.bucket == name],
            tuple(buckets[name]),
            name,
        )
        for name in kept
    ]


def epoch_order(
    num_shards: int,
    num_streams: int,
    *,
    seed: int,
    stage: int,
    source: int,
    epoch: int,
    resample: bool,
) -> np.ndarray:
    """The shard indices of one epoch in reading order (before dealing them to streams).

    With fewer shards than streams and `resample`, the permutation is repeated (each repetition
    drawn afresh) until every stream gets at least one shard; an epoch then holds repeats.

    Raises:
        DataSourceError: fewer shards than streams without `resample`.
    """
    reps = 1
    if num_shards < num_streams:
        if not resample:
            raise DataSourceError(
                f"{num_shards} shards for {num_streams} streams (data.streams): every stream "
                "needs at least one shard; write more, smaller shards (ts-data tokenize "
                "--shard-samples), lower data.streams (0 picks a count that fits), or set "
                "data.resample_shards = true"
            )
        reps = -(-num_streams // num_shards)
    parts = [
        np.random.default_rng([seed, stage, source, epoch, rep, TAG_SHARDS]).permutation(num_shards)
        for rep in range(reps)
    ]
    return np.concatenate(parts)


def stream_shards(order: np.ndarray, stream: int, num_streams: int) -> list[int]:
    """Shards of canonical stream `stream`: the epoch order dealt round-robin to the streams."""
    return [int(i) for i in order[stream::num_streams]]
