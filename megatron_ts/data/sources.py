"""Token-shard sources: their manifests and the deterministic split of shards over streams.

A source is a directory (local or `s3://bucket/prefix/`) holding `manifest.json` and the tar
shards it lists. It is read as C canonical streams (lanes, `data.streams`), whatever the DP size
and worker count. For epoch `e` of source `i` the shards are permuted with an RNG seeded by
(seed, stage, i, e) and dealt round-robin: stream c reads `order[c::C]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_ts.data.manifest import ManifestError, ShardEntry, load_manifest
from megatron_ts.errors import EXIT_DATA
from megatron_ts.vocab import VocabLayout

# Tags that keep the RNG streams of different purposes apart.
TAG_SHARDS = 11
TAG_GROUP = 12
TAG_BUFFER = 13
TAG_MIX = 14
TAG_SYNTHETIC = 15


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


def read_source(
    url: str,
    weight: float,
    *,
    endpoint_url: str | None = None,
    grid: tuple[int, int] | None = None,
) -> SourceSpec:
    """Reads a source's manifest and checks it against the stage.

    Args:
        url: source directory or manifest URL (local or s3://).
        weight: mixing weight.
        endpoint_url: S3 endpoint.
        grid: the stage's (rows, columns) of codes; a manifest with another grid is an error.

    Raises:
        DataSourceError: naming the manifest and the field that is wrong.
    """
    try:
        manifest = load_manifest(url, endpoint_url)
    except ManifestError as exc:
        raise DataSourceError(f"source {url}: {exc}") from exc
    if grid is not None and (manifest.grid, manifest.grid) != tuple(grid):
        raise DataSourceError(
            f"source {url} was tokenized at grid {manifest.grid}x{manifest.grid} (resolution "
            f"{manifest.resolution}), but the stage needs grid {grid[0]}x{grid[1]}; use shards "
            "tokenized at the stage's resolution"
        )
    if not manifest.shards:
        raise DataSourceError(f"source manifest {manifest.url} lists no shards")
    shards = tuple(manifest.shards)
    return SourceSpec(
        url, float(weight), manifest.base_url(), shards, (manifest.grid,) * 2, manifest.vocab
    )


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
