"""The sample pipeline of one canonical stream: small generator stages, read top to bottom.

Canonical stream (source i, lane c) of C lanes (`data.streams`) reads:

    epoch shard order -> the lane's shards (order[c::C]) -> groups of k shards
      -> per shard: open (local / s3 with resume) -> check size -> tar members (hashed)
         -> group by key -> decode+check -> compare sha256 at the tar's end
      -> interleave the k shards in a seeded random order -> seeded shuffle buffer (drained at
         the group's end) -> (epoch, group, offset) cursor after every sample

Every random choice comes from an RNG seeded by (seed, stage, source, epoch, group, lane), so
a stream is a pure function of those numbers and the data, whoever reads it (no DP rank or
worker enters). A cursor (epoch, group, offset) therefore restarts a stream exactly: re-open
that group's shards, replay it and drop `offset` samples; earlier groups and epochs are
skipped without reading them. `megatron_ts.data.order` says which stream sample fills which
global position.
"""

from __future__ import annotations

import ast
import hashlib
import io
import itertools
import math
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander

from megatron_ts.data.sources import (
    TAG_BUFFER,
    TAG_GROUP,
    TAG_SYNTHETIC,
    DataSourceError,
    SourceSpec,
    epoch_order,
    stream_shards,
)
from megatron_ts.errors import EXIT_DATA
from megatron_ts.logging import get_logger
from megatron_ts.storage import IOCounters, open_url

logger = get_logger(__name__)

CODES_FIELD = "codes.npy"
IDS_FIELD = "ids.npy"
_MIN_ERROR_DENOMINATOR = 100
_MAX_EMPTY_EPOCHS = 8


class CorruptDataError(RuntimeError):
    """Too many corrupt samples: names the last bad shard and key."""

    exit_code = EXIT_DATA


class Sample(NamedTuple):
    key: str
    """Sample key inside its shard."""
    url: str
    """Shard the sample came from."""
    codes: np.ndarray
    """(G, G) codebook-local codes."""
    ids: np.ndarray
    """(L,) caption text ids."""
    source: int
    """Index of the stage source."""
    epoch: int
    """Epoch of that source in which the sample was read."""


@dataclass
class ErrorTracker:
    """Counts read and corrupt samples of one worker and stops past the tolerated rate.

    The rate is skipped / max(read, 100), so a few bad samples at the very start do not stop a
    run whose data is otherwise good, while a source that is mostly bad stops within 100 reads.
    """

    max_error_rate: float
    seen: int = 0
    skipped: int = 0
    missing_shards: int = 0
    counters: IOCounters = field(default_factory=IOCounters)

    def ok(self) -> None:
        self.seen += 1

    def bad(
        self, url: str, key: str, reason: str, count: int = 1, *, already_read: bool = False
    ) -> None:
        """Records `count` corrupt samples; raises CorruptDataError past the tolerated rate.

        Args:
            already_read: the samples were counted as read before they were found corrupt (a
                shard whose sha256 differs is known only at its end), so `seen` stays.
        """
        if not already_read:
            self.seen += count
        self.skipped += count
        logger.warning("skipping corrupt data in shard %s key %s: %s", url, key, reason)
        if self.skipped > self.max_error_rate * max(self.seen, _MIN_ERROR_DENOMINATOR):
            raise CorruptDataError(
                f"{self.skipped} of {self.seen} samples read by this worker were corrupt, above "
                f"data.max_error_rate = {self.max_error_rate}; last: shard {url} key {key}: "
                f"{reason}. Re-tokenize or remove that shard, or raise data.max_error_rate"
            )


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def load_npy(buf: bytes) -> np.ndarray:
    """Decodes a .npy file from bytes (read-only view), caching parsed headers.

    Equivalent to `np.load(io.BytesIO(buf), allow_pickle=False)` for plain dtypes; the headers of
    token shards repeat (one per caption length), and parsing them is most of np.load's cost.

    Raises:
        ValueError: not a .npy file, an object dtype, or fewer bytes than the header promises.
    """
    if buf[:6] != _NPY_MAGIC:
        raise ValueError("not a .npy file (bad magic)")
    if buf[6] == 1:
        start, hlen = 10, int.from_bytes(buf[8:10], "little")
    else:
        start, hlen = 12, int.from_bytes(buf[8:12], "little")
    header = buf[start : start + hlen]
    info = _npy_headers.get(header)
    if info is None:
        meta = ast.literal_eval(header.decode("latin1"))
        dtype = np.dtype(meta["descr"])
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed in token shards")
        info = (dtype, tuple(meta["shape"]), bool(meta["fortran_order"]))
        if len(_npy_headers) < 4096:
            _npy_headers[header] = info
    dtype, shape, fortran = info
    arr = np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=start + hlen)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


class HashingReader(io.RawIOBase):
    """A read-only stream that feeds every byte it delivers into a sha256.

    Args:
        stream: the opened shard (closed with this reader).
    """

    def __init__(self, stream: io.IOBase):
        super().__init__()
        self._stream = stream
        self._sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        # Overridden (not only readinto) so tarfile's reads cost no extra copy.
        data = self._stream.read(size)
        self._sha.update(data)
        return data

    def readinto(self, buf) -> int:
        n = self._stream.readinto(buf)
        if n:
            self._sha.update(memoryview(buf)[:n])
        return n

    def drain(self) -> str:
        """Reads the stream to its end into the hash; returns the hex digest of all bytes read."""
        while self.read(1 << 20):
            pass
        return self._sha.hexdigest()

    def close(self) -> None:
        self._stream.close()
        super().close()


# ----------------------------------------------------------------------------------------------
# Stages (each a generator over an iterator; unit-tested on in-memory data)
# ----------------------------------------------------------------------------------------------


def tar_records(
    url: str, stream: io.IOBase, tracker: ErrorTracker, expected: int, sha256: str | None = None
) -> Iterator[dict]:
    """Samples (dicts of raw member bytes keyed by suffix) of one opened tar shard.

    A tar that breaks off (corrupt or truncated shard) ends the shard; the samples the manifest
    promised but that could not be read are counted as corrupt.

    With `sha256` every byte read is hashed as the samples stream by. When the tar was read to
    its end without error, the rest of the stream (padding after the end-of-archive marker) is
    read into the hash too and the digest compared: on a mismatch the shard's `expected` samples
    are counted as corrupt (against `data.max_error_rate`). They have already been yielded, since
    the digest is known only at the end. No digest is compared for a shard that broke off (its
    loss is counted already) or whose generator was closed early (e.g. the loader was closed).
    """
    failure: list[Exception] = []

    def handler(exc: Exception) -> bool:
        failure.append(exc)
        return False  # stop this shard; the caller accounts for the lost samples

    hashed = HashingReader(stream) if sha256 else None
    files = tar_file_expander([{"url": url, "stream": hashed or stream}], handler=handler)
    n = 0
    digest = None
    try:
        for record in group_by_keys(files, handler=handler):
            n += 1
            yield record
        if hashed is not None and not failure and n >= expected:
            digest = hashed.drain()
    finally:
        (hashed or stream).close()
    if failure and not isinstance(failure[0], tarfile.TarError | ValueError | EOFError):
        raise failure[0]  # e.g. S3 retries exhausted: not a data problem, stop the run
    if failure or n < expected:
        # A truncated tar can end without an error from tarfile; the manifest count tells.
        lost = max(expected - n, 1)
        why = f"unreadable tar ({failure[0]})" if failure else "tar ended early"
        tracker.bad(url, f"<after {n} samples>", f"{why}: {lost} of {expected} samples lost", lost)
    elif digest is not None and digest != sha256:
        tracker.bad(
            url,
            "<shard>",
            f"sha256 {digest}, manifest says {sha256}: the shard changed after tokenization and "
            f"its {n} samples were already used; re-run ts-data tokenize for it or restore it",
            max(expected, 1),
            already_read=True,
        )


def shard_records(
    url: str,
    expected: int,
    tracker: ErrorTracker,
    endpoint_url: str | None,
    *,
    size: int | None = None,
    sha256: str | None = None,
) -> Iterator[dict]:
    """Opens one shard lazily, verifies it and yields its raw samples.

    A missing shard is skipped and counted. With `size` (the manifest's `bytes`), a shard of
    another size is skipped whole and its `expected` samples counted as corrupt, before any of
    them is yielded. With `sha256`, the shard is hashed while it streams (see `tar_records`).
    """
    try:
        stream = open_url(url, endpoint_url=endpoint_url, counters=tracker.counters)
    except FileNotFoundError as exc:
        tracker.missing_shards += 1
        tracker.bad(url, "<shard>", f"missing shard ({exc})", max(expected, 1))
        return
    if size is not None:
        actual = stream.raw.size  # for S3: the Content-Length of the opening GET
        if actual != size:
            stream.close()
            tracker.bad(
                url,
                "<shard>",
                f"size {actual} bytes, manifest says {size}: the shard changed after "
                "tokenization; re-run ts-data tokenize for it or restore it",
                max(expected, 1),
            )
            return
    yield from tar_records(url, stream, tracker, expected, sha256)


def decode_records(
    records: Iterable[dict],
    *,
    grid: tuple[int, int],
    text_size: int,
    codebook_size: int,
    source: int,
    epoch: int,
    tracker: ErrorTracker,
) -> Iterator[Sample]:
    """Decodes codes and caption ids and checks them; corrupt samples are counted and skipped.

    Corrupt: a missing member, an unreadable .npy, codes of another shape than `grid` (rows,
    columns),
    codes outside [0, codebook_size), caption ids outside [0, text_size) or not 1-D.
    """
    for rec in records:
        key, url = rec.get("__key__", "?"), rec.get("__url__", "?")
        try:
            if CODES_FIELD not in rec or IDS_FIELD not in rec:
                raise ValueError(
                    f"missing member {CODES_FIELD if CODES_FIELD not in rec else IDS_FIELD}"
                )
            codes = load_npy(rec[CODES_FIELD])
            ids = load_npy(rec[IDS_FIELD])
            if codes.shape != grid:
                raise ValueError(f"codes shape {codes.shape}, expected {grid}")
            if not np.issubdtype(codes.dtype, np.integer):
                raise ValueError(f"codes dtype {codes.dtype} is not an integer type")
            if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
                raise ValueError(
                    f"codes in [{int(codes.min())}, {int(codes.max())}] outside the codebook "
                    f"[0, {codebook_size})"
                )
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"caption ids of shape {ids.shape} and dtype {ids.dtype}")
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= text_size):
                raise ValueError(
                    f"caption ids in [{int(ids.min())}, {int(ids.max())}] outside the text "
                    f"vocabulary [0, {text_size})"
                )
        except Exception as exc:  # noqa: BLE001 - every decode failure is a corrupt sample
            tracker.bad(url, key, str(exc))
            continue
        tracker.ok()
        yield Sample(key, url, codes, ids, source, epoch)


def interleave(iterators: list[Iterator], counts: list[int], rng: np.random.Generator) -> Iterator:
    """Draws from several iterators in a seeded random order.

    The order is a permutation of `counts[i]` copies of i (the manifest's sample counts), so it
    is fixed before any data is read; an iterator that runs out early is passed over, one with
    more items than counted is drained at the end.
    """
    order = rng.permutation(np.repeat(np.arange(len(iterators)), counts))
    live = list(iterators)
    for i in order:
        it = live[i]
        if it is None:
            continue
        try:
            yield next(it)
        except StopIteration:
            live[i] = None
    for it in live:
        if it is not None:
            yield from it


def shuffle_buffer(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """A seeded shuffle buffer of `size` items that is drained (shuffled) when the input ends."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    draws = rng.random(1024)
    d = 0
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        if d == len(draws):
            draws, d = rng.random(1024), 0
        j = int(draws[d] * size)
        d += 1
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[j]


# ----------------------------------------------------------------------------------------------
# Canonical streams
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamContext:
    """Everything a worker needs to rebuild its streams (picklable; sent to worker processes)."""

    seed: int
    stage: int
    streams: int
    """C: canonical streams (lanes) per source."""
    grid: tuple[int, int]
    """(rows, columns) of codes of the synthetic samples (square; sources carry their own)."""
    text_size: int
    codebook_size: int
    caption_len: int
    shuffle_buffer: int
    shards_per_group: int
    max_error_rate: float
    resample_shards: bool
    endpoint_url: str | None


Cursor = tuple[int, int, int]
"""(epoch, group, offset): samples emitted so far in that shard group of that epoch."""


class SourceStream:
    """Canonical stream (source `index`, lane `lane`), resumable from a cursor."""

    def __init__(
        self, ctx: StreamContext, spec: SourceSpec, index: int, lane: int, tracker: ErrorTracker
    ):
        self.ctx = ctx
        self.spec = spec
        self.index = index
        self.lane = lane
        self.tracker = tracker

    def groups(self, epoch: int) -> list[list[int]]:
        """Shard indices of this lane in epoch `epoch`, grouped in groups of k shards."""
        c = self.ctx
        order = epoch_order(
            len(self.spec.shards),
            c.streams,
            seed=c.seed,
            stage=c.stage,
            source=self.index,
            epoch=epoch,
            resample=c.resample_shards,
        )
        mine = stream_shards(order, self.lane, c.streams)
        k = max(1, c.shards_per_group)
        return [mine[i : i + k] for i in range(0, len(mine), k)]

    def _group_samples(self, epoch: int, group: int, shards: list[int]) -> Iterator[Sample]:
        c = self.ctx
        key = [c.seed, c.stage, self.index, epoch, group, self.lane]
        infos = [self.spec.shards[i] for i in shards]
        per_shard = [
            decode_records(
                shard_records(
                    self.spec.base + s.name,
                    s.samples,
                    self.tracker,
                    c.endpoint_url,
                    size=s.bytes,
                    sha256=s.sha256,
                ),
                grid=self.spec.grid,
                text_size=c.text_size,
                codebook_size=c.codebook_size,
                source=self.index,
                epoch=epoch,
                tracker=self.tracker,
            )
            for s in infos
        ]
        mixed = interleave(
            per_shard, [s.samples for s in infos], np.random.default_rng([*key, TAG_GROUP])
        )
        return shuffle_buffer(mixed, c.shuffle_buffer, np.random.default_rng([*key, TAG_BUFFER]))

    def samples(self, cursor: Cursor = (0, 0, 0)) -> Iterator[tuple[Sample, Cursor]]:
        """Yields (sample, cursor after it) forever, starting at `cursor`."""
        epoch, group, offset = cursor
        empty = 0
        while True:
            groups = self.groups(epoch)
            produced = 0
            while group < len(groups):
                emitted = 0
                for sample in self._group_samples(epoch, group, groups[group]):
                    emitted += 1
                    if emitted <= offset:
                        continue  # replaying the part of the group consumed before the resume
                    produced += 1
                    yield sample, (epoch, group, emitted)
                group, offset = group + 1, 0
            # A lane may hold a single shard in an epoch, and that shard may be missing or
            # corrupt; only a run of empty epochs means the source is unreadable.
            empty = empty + 1 if produced == 0 else 0
            if empty >= _MAX_EMPTY_EPOCHS:
                raise DataSourceError(
                    f"source {self.spec.url}: {empty} epochs in a row gave no readable samples "
                    f"to stream {self.lane} of {self.ctx.streams}; check its shards"
                )
            epoch, group, offset = epoch + 1, 0, 0


class StreamReader:
    """Reads one canonical stream forward; `get(i)` returns its sample number i.

    Samples before i that this reader has not emitted yet are read and dropped: another rank
    uses them (a lane shared by several ranks) or a resume started the reader from an earlier
    saved position.
    """

    def __init__(self, stream: SourceStream, index: int = 0, cursor: Cursor = (0, 0, 0)):
        self.stream = stream
        self.index = index
        """Number of the next sample the stream emits."""
        self.cursor = tuple(cursor)
        self._gen: Iterator[tuple[Sample, Cursor]] | None = None

    def get(self, index: int) -> Sample:
        if index < self.index:
            raise RuntimeError(
                f"stream {self.stream.lane} of source {self.stream.spec.url}: sample {index} "
                f"requested after sample {self.index - 1} was read"
            )
        if self._gen is None:
            self._gen = self.stream.samples(self.cursor)
        while True:
            sample, self.cursor = next(self._gen)
            self.index += 1
            if self.index > index:
                return sample

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()


def synthetic_sample(
    ctx: StreamContext, position: int, grid: tuple[int, int] | None = None
) -> Sample:
    """Random codes (of `grid`, default the stage's) and caption at a global position: a pure
    function of (seed, stage, p)."""
    rng = np.random.default_rng([ctx.seed, ctx.stage, position, TAG_SYNTHETIC])
    codes = rng.integers(0, ctx.codebook_size, size=grid or ctx.grid, dtype=np.uint16)
    length = int(rng.integers(1, ctx.caption_len + 8))
    ids = rng.integers(0, ctx.text_size, size=length, dtype=np.int32)
    return Sample(f"synthetic-{position}", "synthetic://", codes, ids, 0, 0)


def batched(items: Iterable, size: int, collate: Callable[[list], dict]) -> Iterator[dict]:
    """Groups items into lists of `size` and collates them (a trailing partial group is dropped)."""
    it = iter(items)
    while True:
        group = list(itertools.islice(it, size))
        if len(group) < size:
            return
        yield collate(group)
