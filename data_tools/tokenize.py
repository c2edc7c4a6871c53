"""`ts-data tokenize` and `ts-data merge`: image/caption shards to token shards.

Every input shard (sorted input list, index i) becomes one or more output shards
`tokens-{i:06d}-{part:03d}.tar`, cut at `shard_bytes` / `shard_samples`; the names do not depend
on the number of workers, so a job may be resumed with another world size. After an input shard's
outputs are written (and, on S3, verified), a record `_done/{i:06d}.json` lists them with sizes and
sha256s plus the per-shard report of skipped samples. A re-run skips inputs whose record exists,
records no failure and lists outputs that exist with the recorded sizes; any other input is redone
from scratch (its partial outputs are overwritten), so an input that failed because the store
was unreachable is retried by the next run. Each rank writes `_ranks/rank-{r:03d}-of-{w:03d}.json`;
`merge` (run automatically when world size is 1) writes `manifest.json` from the done records.

With aspect-ratio buckets (`TokenizeOptions.buckets`) each image goes to the bucket nearest its
ratio, keeps its shape (cropped only by the sliver the ratio needs) and is encoded in batches of
one bucket; every output shard holds one bucket and is named `tokens-{i:06d}-{W}x{H}-{part:03d}.tar`
(the bucket's size in pixels, unique within a bucket list), and the manifest has format /2.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.images import (
    ImageSkip,
    decode_image,
    resize_center_crop,
    resize_to_bucket,
    to_tensor_batch,
)
from data_tools.shards import RawSample, ShardReadError, expand_inputs, iter_samples
from megatron_ts import storage
from megatron_ts.buckets import DEFAULT_GRID_MULTIPLE, Bucket, make_buckets, nearest, parse_ratio
from megatron_ts.data.manifest import Manifest, ShardEntry, save_manifest
from megatron_ts.logging import get_logger
from megatron_ts.storage import S3BucketNotFoundError, is_s3_url
from megatron_ts.vocab import VocabLayout

log = get_logger(__name__)

DONE_DIR = "_done"
RANKS_DIR = "_ranks"
CODE_LIMIT = 1 << 16
"""Codes are stored as uint16: codebooks of up to 65536 codes."""


@dataclass
class TokenizeOptions:
    resolution: int
    """Stage resolution: images are resized and centre-cropped to this square (with `buckets`:
    the side of the pixel budget, resolution^2)."""
    min_size: int | None = None
    """Drop images whose short side is below this (default: resolution // 2)."""
    batch_size: int = 32
    """Images per VQ encode call."""
    shard_bytes: int = 256 * 1024 * 1024
    """Start a new output shard after this many bytes."""
    shard_samples: int = 100_000
    """... or after this many samples."""
    workers: int = 2
    """Threads decoding and resizing images (PIL releases the GIL)."""
    rank: int = 0
    """This worker's index."""
    world_size: int = 1
    """Number of workers splitting the input shards."""
    endpoint_url: str | None = None
    """S3 endpoint for inputs and output."""
    tmp_dir: str | None = None
    """Where shards are staged before upload (default: the system temp dir)."""
    max_samples_per_input: int | None = None
    """Stop each input after this many samples (benchmarks)."""
    buckets: tuple[str, ...] | None = None
    """Aspect-ratio bucket names "W:H" (`--buckets`); None: square images, manifest format /1."""
    grid_multiple: int | None = None
    """Bucket code-grid sides are multiples of this (default 4 with `buckets`; only with them)."""

    def __post_init__(self):
        if self.min_size is None:
            self.min_size = self.resolution // 2
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"--rank {self.rank} must be in [0, --world-size {self.world_size})")
        if self.buckets is None:
            if self.grid_multiple is not None:
                raise ValueError(
                    "--grid-multiple applies only to aspect-ratio buckets; add --buckets (for "
                    "example --buckets 1:1,4:3,3:4) or drop --grid-multiple"
                )
            return
        self.buckets = tuple(str(b).strip() for b in self.buckets)
        if not self.buckets:
            raise ValueError("--buckets lists no ratio; list some, such as 1:1,4:3,3:4")
        for ratio in self.buckets:
            parse_ratio(ratio)  # a malformed ratio stops here, before the VQ is loaded
        if self.grid_multiple is None:
            self.grid_multiple = DEFAULT_GRID_MULTIPLE
        if self.grid_multiple < 1:
            raise ValueError(f"--grid-multiple {self.grid_multiple} must be at least 1")

    def bucket_list(self, downsample: int) -> tuple[Bucket, ...] | None:
        """The buckets' sizes for a VQ of `downsample` (None without buckets).

        Raises:
            ValueError: two ratios give one size or one is listed twice (from `make_buckets`).
        """
        if self.buckets is None:
            return None
        unit = downsample * self.grid_multiple
        try:
            return make_buckets(self.buckets, self.resolution, unit)
        except ValueError as exc:
            raise ValueError(
                f"--buckets: {exc} (sides are multiples of {unit} px: VQ downsample {downsample} "
                f"x --grid-multiple {self.grid_multiple}; a lower --grid-multiple or a larger "
                "--resolution separates them)"
            ) from None


@dataclass
class Timings:
    read: float = 0.0
    decode: float = 0.0
    resize: float = 0.0
    encode: float = 0.0
    text: float = 0.0
    write: float = 0.0
    images: int = 0

    def add(self, other: Timings) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class InputReport:
    index: int
    url: str
    samples: int = 0
    skipped: list[dict] = field(default_factory=list)
    failed: str | None = None
    shards: list[dict] = field(default_factory=list)
    buckets: list[dict] | None = None
    """The bucket list the outputs were made with (bucketed runs only; a re-run with another
    list redoes the input)."""

    def to_dict(self) -> dict:
        out = {
            "index": self.index,
            "url": self.url,
            "samples": self.samples,
            "skipped": self.skipped,
            "failed": self.failed,
            "shards": self.shards,
        }
        if self.buckets is not None:
            out["buckets"] = self.buckets
        return out


def output_name(input_index: int, part: int, bucket: Bucket | None = None) -> str:
    """The output shard's name: `tokens-{input:06d}-{part:03d}.tar`, or with a bucket
    `tokens-{input:06d}-{W}x{H}-{part:03d}.tar` (its size in pixels, unique within a bucket list).

    Names depend only on the input's index, the bucket's size and the part, never on the number
    of workers, so a job may resume with another world size.
    """
    if bucket is None:
        return f"tokens-{input_index:06d}-{part:03d}.tar"
    return f"tokens-{input_index:06d}-{bucket.size}-{part:03d}.tar"


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible bytes: the same input gives the same sha256
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def rank_from_env(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): each from its flag, else from the SLURM array variables, else (0, 1).

    Rank is `SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN` and the world size
    `SLURM_ARRAY_TASK_COUNT`, so an array `--array=0-63` (or `1-64`, with or without a `%N`
    throttle) gives ranks 0..63 of 64. Each value falls back on its own: `--world-size 64` in an
    array job still takes the rank from the task id instead of making every task rank 0.
    """
    env = os.environ
    if rank is None and "SLURM_ARRAY_TASK_ID" in env:
        rank = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    if world_size is None and "SLURM_ARRAY_TASK_COUNT" in env:
        world_size = int(env["SLURM_ARRAY_TASK_COUNT"])
    return (0 if rank is None else rank), (1 if world_size is None else world_size)


class _ShardWriter:
    """Writes output shards of one input to a staging dir, then copies them to the output."""

    def __init__(
        self,
        output: str,
        index: int,
        opts: TokenizeOptions,
        stage: Path,
        bucket: Bucket | None = None,
    ):
        self.output, self.index, self.opts, self.stage = output, index, opts, stage
        self.bucket = bucket
        self.part = -1
        self.tar: tarfile.TarFile | None = None
        self.path: Path | None = None
        self.samples = 0
        self.entries: list[dict] = []

    def _open(self) -> None:
        self.part += 1
        self.path = self.stage / output_name(self.index, self.part, self.bucket)
        self.tar = tarfile.open(self.path, "w", format=tarfile.GNU_FORMAT)
        self.samples = 0

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self.tar is None:
            self._open()
        for suffix, data in members:
            _add(self.tar, f"{key}.{suffix}", data)
        self.samples += 1
        if (
            self.samples >= self.opts.shard_samples
            or self.tar.fileobj.tell() >= self.opts.shard_bytes
        ):
            self.close()

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        name = self.path.name
        url = storage.join(self.output, name)
        sha = storage.upload_file(self.path, url, self.opts.endpoint_url)
        size = self.path.stat().st_size
        entry = {"name": name, "samples": self.samples, "bytes": size, "sha256": sha}
        if self.bucket is not None:
            entry["bucket"] = self.bucket.name
        self.entries.append(entry)
        self.path.unlink()
        self.tar = None


def _prepare(sample: RawSample, opts: TokenizeOptions, buckets: tuple[Bucket, ...] | None) -> tuple:
    """Decode + resize in a worker thread: (array | None, reason | None, meta, t_dec, t_res).

    meta is (original width, original height, bucket or None).
    """
    t0 = time.perf_counter()
    found = sample.image_member()
    if found is None:
        return None, "missing image (.jpg/.png/.webp)", None, 0.0, 0.0
    if "txt" not in sample.members:
        return None, "missing caption (.txt)", None, 0.0, 0.0
    # JPEG draft keeps this many pixels on the short side: a bucket's longest side covers any
    # bucket's need (the resized short side is at most the bucket's long side)
    keep = opts.resolution if buckets is None else max(max(b.width, b.height) for b in buckets)
    try:
        img, width, height = decode_image(found[1], keep, opts.min_size)
    except ImageSkip as exc:
        return None, str(exc), None, time.perf_counter() - t0, 0.0
    t1 = time.perf_counter()
    bucket = None if buckets is None else nearest(buckets, width, height)
    try:
        if bucket is None:
            arr = resize_center_crop(img, opts.resolution)
        else:
            arr = resize_to_bucket(img, bucket.width, bucket.height)
    except Exception as exc:  # noqa: BLE001 - a broken image must not stop the shard
        return None, f"undecodable image: {exc}", None, t1 - t0, 0.0
    return arr, None, (width, height, bucket), t1 - t0, time.perf_counter() - t1


def tokenize_input(
    index: int,
    url: str,
    output: str,
    vq,
    text_tok,
    opts: TokenizeOptions,
    pool: ThreadPoolExecutor,
    timings: Timings,
    buckets: tuple[Bucket, ...] | None = None,
) -> InputReport:
    """Tokenizes one input shard into output shard(s); returns its report.

    With `buckets`, every bucket that receives samples gets its own output shard(s).
    """
    report = InputReport(index, url)
    if buckets is not None:
        report.buckets = [b.to_dict() for b in buckets]
    stage = Path(tempfile.mkdtemp(prefix="ts-tokenize-", dir=opts.tmp_dir))
    writers: dict[Bucket | None, _ShardWriter] = {}
    # images waiting for a VQ encode, by bucket: the encoder takes one image shape per batch
    batches: dict[Bucket | None, list] = {}

    def flush(batch: list[tuple[RawSample, np.ndarray, tuple]]) -> None:
        if not batch:
            return
        bucket = batch[0][2][2]
        if bucket not in writers:
            writers[bucket] = _ShardWriter(output, index, opts, stage, bucket)
        writer = writers[bucket]
        t0 = time.perf_counter()
        codes = vq.encode(to_tensor_batch([a for _, a, _ in batch])).cpu().numpy()
        t1 = time.perf_counter()
        timings.encode += t1 - t0
        for (sample, _, (w, h, _)), grid in zip(batch, codes):
            text = sample.members["txt"].decode("utf-8", errors="replace").strip()
            t2 = time.perf_counter()
            ids = np.asarray(text_tok.encode(text), dtype=np.int32)
            timings.text += time.perf_counter() - t2
            try:
                meta = json.loads(sample.members.get("json", b"{}") or b"{}")
                if not isinstance(meta, dict):
                    meta = {"json": meta}
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
            meta.update({"source_shard": url, "original_width": w, "original_height": h})
            t3 = time.perf_counter()
            writer.add(
                sample.key,
                [
                    ("codes.npy", _npy(grid.astype(np.uint16))),
                    ("ids.npy", _npy(ids)),
                    ("txt", text.encode("utf-8")),
                    ("json", json.dumps(meta, sort_keys=True).encode()),
                ],
            )
            timings.write += time.perf_counter() - t3
            report.samples += 1
        timings.images += len(batch)

    def consume(pending: list) -> None:
        for sample, fut in pending:
            arr, reason, meta, t_dec, t_res = fut.result()
            timings.decode += t_dec
            timings.resize += t_res
            if arr is None:
                report.skipped.append({"key": sample.key, "reason": reason})
                continue
            batch = batches.setdefault(meta[2], [])
            batch.append((sample, arr, meta))
            if len(batch) == opts.batch_size:
                flush(batches.pop(meta[2]))
        if buckets is None:
            # square runs encode the rest of every read-ahead window, as before buckets; bucketed
            # runs keep partial batches until the input ends, so batches stay full
            flush_all()

    def flush_all() -> None:
        for bucket in list(batches):
            flush(batches.pop(bucket))

    try:
        pending: list = []
        t_read = time.perf_counter()
        seen = 0
        for item in iter_samples(url, opts.endpoint_url):
            if isinstance(item, ShardReadError) and seen == 0 and item.key is None:
                raise OSError(item.error)  # nothing readable: the whole shard failed
            if isinstance(item, ShardReadError):
                report.skipped.append({"key": item.key, "reason": item.error})
                log.warning(
                    "%s: %s (key %s); samples before it are kept", url, item.error, item.key
                )
                break
            timings.read += time.perf_counter() - t_read
            pending.append((item, pool.submit(_prepare, item, opts, buckets)))
            seen += 1
            if len(pending) >= opts.batch_size * 2:
                consume(pending)
                pending = []
            if opts.max_samples_per_input and seen >= opts.max_samples_per_input:
                break
            t_read = time.perf_counter()
        consume(pending)
        flush_all()
        t3 = time.perf_counter()
        for writer in writers.values():
            writer.close()
        timings.write += time.perf_counter() - t3
    except S3BucketNotFoundError:
        raise  # the bucket went away: no other input or output can succeed either
    except (FileNotFoundError, OSError) as exc:
        report.failed = f"{type(exc).__name__}: {exc}"
        log.error(
            "input shard %s is unreadable or its output could not be written: %s; a re-run "
            "retries it",
            url,
            report.failed,
        )
        for writer in writers.values():
            writer.tar = None
    finally:
        for p in stage.iterdir():
            p.unlink()
        stage.rmdir()
    entries = [e for writer in writers.values() for e in writer.entries]
    report.shards = sorted(entries, key=lambda e: e["name"]) if report.failed is None else []
    if report.skipped:
        log.warning(
            "%s: skipped %d sample(s): %s",
            url,
            len(report.skipped),
            "; ".join(f"{s['key']}: {s['reason']}" for s in report.skipped[:10]),
        )
    return report


def _is_done(
    output: str, index: int, url: str, endpoint_url: str | None, buckets: list[dict] | None = None
) -> dict | None:
    """The done record of input `index` if it and every output it lists are present.

    A record made with another bucket list (or made square when this run has buckets, or the
    other way round) is not done: the input is redone.
    """
    rec_url = storage.join(output, f"{DONE_DIR}/{index:06d}.json")
    if not storage.exists(rec_url, endpoint_url):
        return None
    try:
        rec = json.loads(storage.read_bytes(rec_url, endpoint_url))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    if rec.get("url") != url or rec.get("failed"):
        return None  # another input list, or a failure that may have been transient: redo it
    if rec.get("buckets") != buckets:
        return None
    for shard in rec.get("shards", []):
        size = storage.stat_size(storage.join(output, shard["name"]), endpoint_url)
        if size != shard["bytes"]:
            return None
    return rec


def header(
    vq,
    text_tok,
    resolution: int,
    buckets: tuple[Bucket, ...] | None = None,
    grid_multiple: int | None = None,
) -> dict:
    """The manifest fields that identify the tokenizers, resolution and buckets."""
    vocab = VocabLayout(
        text_size=text_tok.vocab_size,
        codebook_size=vq.codebook_size,
        text_tokenizer=text_tok.identity,
        vq_tokenizer=vq.identity,
    )
    sha = vq.identity.split(":", 1)[1] if ":" in vq.identity else None
    out = {
        "resolution": resolution,
        "grid": resolution // vq.downsample,
        "downsample": vq.downsample,
    }
    if buckets is not None:
        out["buckets"] = [b.to_dict() for b in buckets]
        out["grid_multiple"] = grid_multiple
    return out | {
        "vocab": vocab.to_dict(),
        "vq": {
            "format": vq.format,
            "checkpoint_sha256": getattr(vq, "checkpoint_sha256", None) or sha,
            "codebook_size": vq.codebook_size,
            "downsample": vq.downsample,
            "identity": vq.identity,
        },
        "text_tokenizer": {
            "spec": "byte" if text_tok.identity == "byte" else Path(text_tok.path).name,
            "identity": text_tok.identity,
            "vocab_size": text_tok.vocab_size,
        },
    }


def tokenize(
    inputs: list[str], output: str, vq, text_tok, opts: TokenizeOptions, merge_after: bool = True
) -> dict:
    """Tokenizes this rank's share of the input shards.

    Args:
        inputs: input patterns (see `data_tools.shards.expand_inputs`).
        output: output directory or s3:// prefix.
        vq: a loaded VQ tokenizer.
        text_tok: a loaded text tokenizer.
        opts: options.
        merge_after: write manifest.json when world_size is 1.

    Returns:
        The rank summary (also written to `_ranks/`), with timings.

    Raises:
        megatron_ts.storage.S3BucketNotFoundError: the output's or an input's bucket does not exist
            (before any work); an unreadable input shard is recorded as failed instead.
        megatron_ts.storage.S3AccessError: S3 credentials missing or refused.
    """
    if vq.codebook_size > CODE_LIMIT:
        raise ValueError(
            f"VQ codebook of {vq.codebook_size} codes does not fit the uint16 codes.npy of token "
            f"shards (at most {CODE_LIMIT})"
        )
    if opts.resolution % vq.downsample:
        raise ValueError(
            f"--resolution {opts.resolution} is not a multiple of the VQ downsampling "
            f"{vq.downsample}"
        )
    buckets = opts.bucket_list(vq.downsample)
    if buckets is not None:
        log.info(
            "tokenize: aspect-ratio buckets %s",
            ", ".join(f"{b.name}={b.size}" for b in buckets),
        )
    bucket_dicts = None if buckets is None else [b.to_dict() for b in buckets]
    # A missing output or input bucket stops here, before any shard is read or encoded.
    storage.check_bucket(output, opts.endpoint_url)
    urls = expand_inputs(inputs, opts.endpoint_url)
    mine = [(i, u) for i, u in enumerate(urls) if i % opts.world_size == opts.rank]
    log.info(
        "tokenize: rank %d/%d takes %d of %d input shards -> %s",
        opts.rank,
        opts.world_size,
        len(mine),
        len(urls),
        output,
    )
    if not is_s3_url(output):
        Path(output).mkdir(parents=True, exist_ok=True)
    timings = Timings()
    reports, skipped_inputs = [], 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, opts.workers)) as pool:
        for index, url in mine:
            rec = _is_done(output, index, url, opts.endpoint_url, bucket_dicts)
            if rec is not None:
                reports.append(rec)
                skipped_inputs += 1
                continue
            report = tokenize_input(index, url, output, vq, text_tok, opts, pool, timings, buckets)
            rec = report.to_dict()
            storage.write_bytes(
                storage.join(output, f"{DONE_DIR}/{index:06d}.json"),
                json.dumps(rec, indent=1).encode(),
                opts.endpoint_url,
            )
            reports.append(rec)
    seconds = time.perf_counter() - t0
    summary = {
        **header(vq, text_tok, opts.resolution, buckets, opts.grid_multiple),
        "rank": opts.rank,
        "world_size": opts.world_size,
        "num_inputs": len(urls),
        "inputs": [r["index"] for r in reports],
    }
    storage.write_bytes(
        storage.join(output, f"{RANKS_DIR}/rank-{opts.rank:03d}-of-{opts.world_size:03d}.json"),
        json.dumps(summary, indent=1).encode(),
        opts.endpoint_url,
    )
    done_now = len(reports) - skipped_inputs
    log.info(
        "tokenize: rank %d wrote %d input(s), skipped %d finished, %d images in %.1fs",
        opts.rank,
        done_now,
        skipped_inputs,
        timings.images,
        seconds,
    )
    result = {
        "inputs_done": done_now,
        "inputs_skipped": skipped_inputs,
        "images": timings.images,
        "seconds": seconds,
        "timings": {k: getattr(timings, k) for k in timings.__dataclass_fields__},
        "samples_skipped": sum(len(r["skipped"]) for r in reports),
        "failed_inputs": [r["url"] for r in reports if r.get("failed")],
    }
    if merge_after and opts.world_size == 1:
        result["manifest"] = merge(output, opts.endpoint_url)
    return result


def _read_record(url: str, endpoint_url: str | None) -> dict:
    """A rank summary or done record, with a damaged one named (ValueError: usage, exit 2)."""
    try:
        return json.loads(storage.read_bytes(url, endpoint_url))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{url} is damaged ({exc}): delete it and re-run the rank that wrote it (inputs it "
            "finished are skipped)"
        ) from None


def merge(output: str, endpoint_url: str | None = None) -> str:
    """Writes manifest.json of `output` from its rank summaries and per-input done records.

    Raises:
        ValueError: a rank summary is missing, ranks disagree on tokenizers, resolution or
            buckets, or an input shard has no done record (naming it and the rank to re-run).
        megatron_ts.data.manifest.ManifestError: a done record lists a shard of a bucket the
            ranks did not use (a record left by a run with other buckets: re-run tokenize).
    """
    rank_urls = storage.list_prefix(storage.join(output, RANKS_DIR), endpoint_url, ".json")
    if not rank_urls:
        raise ValueError(f"{output}: no rank summaries under {RANKS_DIR}/; run `ts-data tokenize`")
    summaries = [_read_record(u, endpoint_url) for u in rank_urls]
    world = max(s["world_size"] for s in summaries)
    latest = {s["rank"]: s for s in summaries if s["world_size"] == world}
    missing = sorted(set(range(world)) - set(latest))
    if missing:
        raise ValueError(
            f"{output}: no summary from rank {missing[0]} of {world}; run "
            f"`ts-data tokenize ... --rank {missing[0]} --world-size {world}` first"
        )
    ident_keys = ("resolution", "grid", "downsample", "vocab", "vq", "text_tokenizer")
    ident_keys += ("buckets", "grid_multiple")  # absent (None) in square runs
    first = latest[0]
    for r, s in latest.items():
        for k in ident_keys:
            if s.get(k) != first.get(k):
                raise ValueError(
                    f"{output}: rank {r} has {k} {s.get(k)!r} but rank 0 has {first.get(k)!r}; "
                    "all ranks must use the same tokenizers, resolution and --buckets"
                )
    num_inputs = first["num_inputs"]
    shards, inputs, reasons = [], [], Counter()
    for index in range(num_inputs):
        rec_url = storage.join(output, f"{DONE_DIR}/{index:06d}.json")
        if not storage.exists(rec_url, endpoint_url):
            raise ValueError(
                f"{output}: input shard #{index} has no done record ({rec_url}); re-run rank "
                f"{index % world} of {world}"
            )
        rec = _read_record(rec_url, endpoint_url)
        shards += [ShardEntry(**s) for s in rec["shards"]]
        for s in rec["skipped"]:
            reasons[s["reason"].split(":")[0]] += 1
        inputs.append(
            {
                "url": rec["url"],
                "samples": rec["samples"],
                "skipped": len(rec["skipped"]),
                "failed": rec["failed"],
            }
        )
    manifest = Manifest(
        resolution=first["resolution"],
        grid=first["grid"],
        downsample=first["downsample"],
        vocab=VocabLayout.from_dict(first["vocab"]),
        vq=first["vq"],
        text_tokenizer=first["text_tokenizer"],
        shards=sorted(shards, key=lambda s: s.name),
        buckets=tuple(Bucket.from_dict(b) for b in first["buckets"])
        if "buckets" in first
        else None,
        grid_multiple=first.get("grid_multiple"),
        extra={
            "inputs": inputs,
            "skipped": dict(sorted(reasons.items())),
            "failed_inputs": [i["url"] for i in inputs if i["failed"]],
        },
    )
    url = save_manifest(manifest, output, endpoint_url)
    log.info("merge: %s lists %d shards, %d samples", url, len(shards), manifest.total_samples)
    return url


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
