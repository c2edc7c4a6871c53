"""The token-shard manifest (`manifest.json`): reading, writing and validation.

A token-shard directory (local or `s3://bucket/prefix/`) holds tar shards and one manifest:

    {"format": "megatron_ts.tokens/1", "resolution": R, "grid": G, "downsample": D,
     "vocab": VocabLayout.to_dict(),
     "vq": {"format", "checkpoint_sha256", "codebook_size", "downsample", "identity"},
     "text_tokenizer": {"spec", "identity", "vocab_size"},
     "shards": [{"name", "samples", "bytes", "sha256"}], "total_samples": N,
     "inputs": [...per input shard report...], "skipped": {...reason: count...}}

`ts-data tokenize --buckets` writes format "megatron_ts.tokens/2": the same fields plus
`"buckets": [{"name", "width", "height"}, ...]` (in the order given), `"grid_multiple": m`, and a
`"bucket": "<name>"` in every shard entry (a shard holds one bucket). "resolution" is then the side
of the pixel budget and "grid" stays resolution / downsample; a bucket's code grid is
`bucket_grid(name)`. The bucket sizes must equal `megatron_ts.buckets.make_buckets(names,
resolution, downsample * grid_multiple)`.

`ts-data tokenize` writes it; the loader (`data/sources.py`) and `ts-data inspect` read it through
`load_manifest`, the one reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from megatron_ts import storage
from megatron_ts.buckets import SQUARE, Bucket, make_buckets
from megatron_ts.errors import EXIT_DATA
from megatron_ts.vocab import VocabLayout

MANIFEST_FORMAT = "megatron_ts.tokens/1"
"""Square images, one grid."""
MANIFEST_FORMAT_BUCKETS = "megatron_ts.tokens/2"
"""Aspect-ratio buckets: /1 plus `buckets`, `grid_multiple` and a `bucket` per shard."""
FORMATS = (MANIFEST_FORMAT, MANIFEST_FORMAT_BUCKETS)
MANIFEST_NAME = "manifest.json"
REQUIRED = ("format", "resolution", "grid", "downsample", "vocab", "vq", "shards", "total_samples")
REQUIRED_BUCKETS = ("buckets", "grid_multiple")
"""Also required by format /2."""


class ManifestError(ValueError):
    """A manifest that is missing, malformed or inconsistent; names the URL and field."""

    exit_code = EXIT_DATA


@dataclass(frozen=True)
class ShardEntry:
    name: str
    """File name of the shard, relative to the manifest's directory."""
    samples: int
    """Samples in the shard."""
    bytes: int | None = None
    """Size of the tar in bytes; None in a hand-written manifest that does not say (the loader
    then does not check the size)."""
    sha256: str | None = None
    """Lower-case sha256 hex digest of the tar; None when the manifest does not say (or says "")
    (the loader then does not hash the shard)."""
    bucket: str | None = None
    """Name of the aspect-ratio bucket all its samples are in (format /2); None in format /1."""

    def to_dict(self) -> dict:
        out = {"name": self.name, "samples": self.samples}
        if self.bytes is not None:
            out["bytes"] = self.bytes
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        if self.bucket is not None:
            out["bucket"] = self.bucket
        return out

    @classmethod
    def from_dict(cls, entry: dict) -> ShardEntry:
        size, sha, bucket = entry.get("bytes"), entry.get("sha256") or None, entry.get("bucket")
        return cls(
            str(entry["name"]),
            int(entry["samples"]),
            None if size is None else int(size),
            None if sha is None else str(sha).lower(),
            None if bucket is None else str(bucket),
        )


@dataclass
class Manifest:
    resolution: int
    """Image side in pixels the codes were made at."""
    grid: int
    """Codes per image side (resolution / downsample)."""
    downsample: int
    """VQ downsampling factor."""
    vocab: VocabLayout
    """The combined vocabulary layout the shards were tokenized for."""
    vq: dict[str, Any]
    """VQ tokenizer: format, checkpoint_sha256, codebook_size, downsample, identity."""
    text_tokenizer: dict[str, Any]
    """Text tokenizer: spec (file name or byte), identity, vocab_size."""
    shards: list[ShardEntry] = field(default_factory=list)
    """Shards in name order."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other fields (inputs, skipped counts, rank) carried through unchanged."""
    url: str | None = None
    """Where it was read from (not written)."""
    buckets: tuple[Bucket, ...] | None = None
    """Aspect-ratio buckets in the order tokenize was given them (format /2); None in format /1."""
    grid_multiple: int | None = None
    """Code-grid sides of every bucket are multiples of this (format /2); None in format /1."""

    @property
    def format(self) -> str:
        """The format string written: /2 when the set has buckets, else /1."""
        return MANIFEST_FORMAT if self.buckets is None else MANIFEST_FORMAT_BUCKETS

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bucket_samples(self) -> dict[str, int]:
        """Samples per bucket name, in bucket order (zero for a bucket no shard holds).

        A format /1 set is one square bucket: {"1:1": total_samples}.
        """
        if self.buckets is None:
            return {SQUARE: self.total_samples}
        counts = {b.name: 0 for b in self.buckets}
        for s in self.shards:
            counts[s.bucket] = counts.get(s.bucket, 0) + s.samples
        return counts

    def bucket_grid(self, name: str | None) -> tuple[int, int]:
        """(rows, columns) of the codes of bucket `name` (a shard entry's `bucket`).

        In format /1 every shard is square: None or "1:1" gives (grid, grid).

        Raises:
            ManifestError: the manifest has no bucket of that name.
        """
        if self.buckets is None and name in (None, SQUARE):
            return self.grid, self.grid
        for bucket in self.buckets or ():
            if bucket.name == name:
                return bucket.grid(self.downsample)
        listed = ", ".join(b.name for b in self.buckets or ()) or "none (format /1)"
        raise ManifestError(
            f"{self.url or 'manifest'}: no bucket {name!r}; its buckets are {listed}"
        )

    @property
    def codebook_size(self) -> int:
        return int(self.vq.get("codebook_size", self.vocab.codebook_size))

    def base_url(self) -> str:
        """Directory URL holding the shards (with a trailing slash)."""
        if self.url is None:
            raise ManifestError("manifest was not read from a URL; pass the directory explicitly")
        return self.url.rsplit("/", 1)[0] + "/"

    def shard_urls(self) -> list[str]:
        base = self.base_url()
        return [base + s.name for s in self.shards]

    def to_dict(self) -> dict:
        out = {
            "format": self.format,
            "resolution": self.resolution,
            "grid": self.grid,
            "downsample": self.downsample,
        }
        if self.buckets is not None:
            out["buckets"] = [b.to_dict() for b in self.buckets]
            out["grid_multiple"] = self.grid_multiple
        out |= {
            "vocab": self.vocab.to_dict(),
            "vq": self.vq,
            "text_tokenizer": self.text_tokenizer,
            "shards": [s.to_dict() for s in self.shards],
            "total_samples": self.total_samples,
        }
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict, url: str | None = None) -> Manifest:
        where = url or "manifest"
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: not a JSON object")
        for key in REQUIRED:
            if key not in data:
                raise ManifestError(f"{where}: missing field {key!r}; re-run `ts-data tokenize`")
        if data["format"] not in FORMATS:
            raise ManifestError(
                f"{where}: format {data['format']!r}, expected one of {', '.join(FORMATS)}; "
                "re-tokenize with this version of ts-data"
            )
        bucketed = data["format"] == MANIFEST_FORMAT_BUCKETS
        for key in REQUIRED_BUCKETS:
            if bucketed and key not in data:
                raise ManifestError(
                    f"{where}: format {MANIFEST_FORMAT_BUCKETS} without field {key!r}; re-run "
                    "`ts-data tokenize --buckets ...`"
                )
            if not bucketed and key in data:
                raise ManifestError(
                    f"{where}: format {MANIFEST_FORMAT} has field {key!r}, which only format "
                    f"{MANIFEST_FORMAT_BUCKETS} has; set the format or drop the field"
                )
        buckets = None
        if bucketed:
            try:
                buckets = tuple(Bucket.from_dict(b) for b in data["buckets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ManifestError(
                    f"{where}: buckets is malformed ({exc!r}); it is a list of "
                    '{"name": "W:H", "width": W, "height": H}'
                ) from exc
        shards = []
        for i, s in enumerate(data["shards"]):
            try:
                shards.append(ShardEntry.from_dict(s))
            except (KeyError, TypeError, ValueError) as exc:
                raise ManifestError(f"{where}: shards[{i}] is malformed ({exc!r})") from exc
        m = cls(
            resolution=int(data["resolution"]),
            grid=int(data["grid"]),
            downsample=int(data["downsample"]),
            vocab=VocabLayout.from_dict(data["vocab"]),
            vq=dict(data["vq"]),
            text_tokenizer=dict(data.get("text_tokenizer", {})),
            shards=shards,
            extra={
                k: v
                for k, v in data.items()
                if k not in REQUIRED + REQUIRED_BUCKETS and k != "text_tokenizer"
            },
            url=url,
            buckets=buckets,
            grid_multiple=int(data["grid_multiple"]) if bucketed else None,
        )
        m.validate(int(data["total_samples"]))
        return m

    def validate(self, total_samples: int | None = None) -> None:
        """Checks internal consistency; raises ManifestError naming the field."""
        where = self.url or "manifest"
        if self.grid * self.downsample != self.resolution:
            raise ManifestError(
                f"{where}: grid {self.grid} x downsample {self.downsample} != resolution "
                f"{self.resolution}"
            )
        if self.vocab.codebook_size != self.codebook_size:
            raise ManifestError(
                f"{where}: vocab.codebook_size {self.vocab.codebook_size} != vq.codebook_size "
                f"{self.codebook_size}"
            )
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ManifestError(f"{where}: shard {dup!r} is listed twice")
        if total_samples is not None and total_samples != self.total_samples:
            raise ManifestError(
                f"{where}: total_samples {total_samples} but the shards hold {self.total_samples}"
            )
        self._validate_buckets(where)

    def _validate_buckets(self, where: str) -> None:
        """Bucket sizes as `make_buckets` gives them, and every shard in a listed bucket."""
        if self.buckets is None:
            if self.grid_multiple is not None:
                raise ManifestError(f"{where}: grid_multiple is set but buckets is not")
            for i, s in enumerate(self.shards):
                if s.bucket is not None:
                    raise ManifestError(
                        f"{where}: shards[{i}] ({s.name}) has bucket {s.bucket!r} but the "
                        f"manifest lists no buckets; a bucketed set has format "
                        f"{MANIFEST_FORMAT_BUCKETS} with a buckets field"
                    )
            return
        if self.grid_multiple is None or self.grid_multiple < 1:
            raise ManifestError(
                f"{where}: grid_multiple {self.grid_multiple!r} must be a positive integer (the "
                "`ts-data tokenize --grid-multiple` the set was made with)"
            )
        unit = self.downsample * self.grid_multiple
        try:
            want = make_buckets([b.name for b in self.buckets], self.resolution, unit)
        except ValueError as exc:
            raise ManifestError(f"{where}: buckets: {exc}") from exc
        for i, (got, ok) in enumerate(zip(self.buckets, want)):
            if got != ok:
                raise ManifestError(
                    f"{where}: buckets[{i}] {got.name} is {got.size} pixels, but at resolution "
                    f"{self.resolution} with downsample {self.downsample} x grid_multiple "
                    f"{self.grid_multiple} it is {ok.size} (megatron_ts.buckets.make_buckets); "
                    "re-tokenize, or fix resolution/grid_multiple to the values it was made with"
                )
        names = {b.name for b in self.buckets}
        for i, s in enumerate(self.shards):
            if s.bucket not in names:
                raise ManifestError(
                    f"{where}: shards[{i}] ({s.name}) has bucket {s.bucket!r}, which is not in "
                    f"buckets ({', '.join(b.name for b in self.buckets)}); every shard of a "
                    f"{MANIFEST_FORMAT_BUCKETS} set names one of its buckets: re-run `ts-data "
                    "merge` or re-tokenize"
                )


def manifest_url(url: str) -> str:
    """The manifest URL of a token-shard directory (or the URL itself if it names a .json)."""
    if url.endswith(".json"):
        return url
    return storage.join(url, MANIFEST_NAME)


def load_manifest(url: str, endpoint_url: str | None = None) -> Manifest:
    """Reads and validates a manifest.

    Args:
        url: token-shard directory or manifest URL, local or s3://.
        endpoint_url: S3 endpoint.

    Raises:
        ManifestError: missing, unreadable or inconsistent manifest (naming the URL and field).
    """
    murl = manifest_url(url)
    try:
        raw = storage.read_bytes(murl, endpoint_url)
    except FileNotFoundError as exc:
        raise ManifestError(
            f"manifest {murl} not found; run `ts-data tokenize` (and `ts-data merge` for "
            "multi-rank runs) for this directory, or fix the URL"
        ) from exc
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{murl} is not valid JSON: {exc}") from exc
    return Manifest.from_dict(data, murl)


def save_manifest(manifest: Manifest, url: str, endpoint_url: str | None = None) -> str:
    """Writes `manifest` as the manifest of directory `url` (atomically); returns its URL."""
    manifest.validate()
    murl = manifest_url(url)
    storage.write_bytes(murl, manifest.to_json().encode(), endpoint_url)
    return murl
