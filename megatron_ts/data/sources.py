"""Token-shard sources: their manifests and the deterministic split of shards over streams.

A source is a directory (local or `s3://bucket/prefix/`) holding `manifest.json` and the tar
shards it lists. It is read as C canonical streams (lanes, `data.streams`), whatever the DP size
and worker count. For epoch `e` of source `i` the shards are permuted with an RNG seeded by
(seed, stage, i, e) and dealt round-robin: stream c reads `order[c::C]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from megatron_ts.data.s3_stream import read_bytes
from megatron_ts.errors import EXIT_DATA
from megatron_ts.vocab import VocabLayout

MANIFEST_FORMAT = "megatron_ts.tokens/1"

# Tags that keep the RNG streams of different purposes apart.
TAG_SHARDS = 11
TAG_WINDOW = 12
TAG_BUFFER = 13
TAG_MIX = 14
TAG_SYNTHETIC = 15


class DataSourceError(ValueError):
    """A source that cannot be read as configured; the message names the source and the fix."""

    exit_code = EXIT_DATA


@dataclass(frozen=True)
class ShardInfo:
    url: str
    """Full local path or s3:// URL of the shard."""
    samples: int
    """Samples in the shard according to the manifest."""
    bytes: int | None = None
    """Size of the tar according to the manifest; None when the manifest does not say (then the
    loader does not check the size)."""
    sha256: str | None = None
    """Lower-case hex sha256 of the tar according to the manifest; None when the manifest does not
    say (then the loader does not hash the shard)."""


@dataclass(frozen=True)
class SourceSpec:
    """One resolved source of a stage."""

    url: str
    """The source directory as configured."""
    weight: float
    """Mixing weight among the stage's sources."""
    shards: tuple[ShardInfo, ...]
    """Shards listed by the manifest, in manifest order."""
    grid: int
    """Codes per image side."""
    vocab: VocabLayout | None
    """Vocabulary layout the shards were tokenized with."""


def _manifest_url(url: str) -> tuple[str, str]:
    """Returns (manifest URL, directory URL with a trailing slash) of a source URL."""
    if url.endswith(".json"):
        return url, url.rsplit("/", 1)[0] + "/"
    base = url if url.endswith("/") else url + "/"
    return base + "manifest.json", base


def _load_manifest(url: str, endpoint_url: str | None) -> dict:
    # The data-tools module `megatron_ts.data.manifest` validates manifests in depth; use it when
    # it is installed, else read the JSON and check the fields the loader relies on.
    try:
        raw = read_bytes(url, endpoint_url)
    except FileNotFoundError as exc:
        raise DataSourceError(
            f"source manifest {url} not found; run `ts-data tokenize` for this source or fix "
            "the source url"
        ) from exc
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataSourceError(f"source manifest {url} is not valid JSON: {exc}") from exc
    for key in ("format", "grid", "shards"):
        if key not in manifest:
            raise DataSourceError(f"source manifest {url} lacks the field {key!r}; re-tokenize")
    if manifest["format"] != MANIFEST_FORMAT:
        raise DataSourceError(
            f"source manifest {url} has format {manifest['format']!r}; this loader reads "
            f"{MANIFEST_FORMAT!r}"
        )
    return manifest


def _shard_info(base: str, entry: dict) -> ShardInfo:
    # `bytes` and `sha256` are optional: older or hand-written manifests without them still load,
    # they are just not verified (an empty sha256 counts as absent).
    size = entry.get("bytes")
    sha = entry.get("sha256") or None
    return ShardInfo(
        base + entry["name"],
        int(entry["samples"]),
        None if size is None else int(size),
        None if sha is None else str(sha).lower(),
    )


def read_source(
    url: str, weight: float, *, endpoint_url: str | None = None, grid: int | None = None
) -> SourceSpec:
    """Reads a source's manifest and checks it against the stage.

    Args:
        url: source directory or manifest URL (local or s3://).
        weight: mixing weight.
        endpoint_url: S3 endpoint.
        grid: the stage's codes per side; a manifest with another grid is an error.

    Raises:
        DataSourceError: naming the manifest and the field that is wrong.
    """
    murl, base = _manifest_url(url)
    manifest = _load_manifest(murl, endpoint_url)
    if grid is not None and int(manifest["grid"]) != grid:
        raise DataSourceError(
            f"source {url} was tokenized at grid {manifest['grid']} (resolution "
            f"{manifest.get('resolution')}), but the stage needs grid {grid}; use shards "
            "tokenized at the stage's resolution"
        )
    shards = tuple(_shard_info(base, s) for s in manifest["shards"])
    if not shards:
        raise DataSourceError(f"source manifest {murl} lists no shards")
    vocab = VocabLayout.from_dict(manifest["vocab"]) if "vocab" in manifest else None
    return SourceSpec(url, float(weight), shards, int(manifest["grid"]), vocab)


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
