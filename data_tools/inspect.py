"""`ts-data inspect`: checks a token-shard directory against its manifest.

Reads every shard listed by the manifest and reports sample counts, the original-resolution
histogram, the aspect-ratio bucket histogram, caption-length statistics, the code range against the
manifest's codebook size, and every unreadable sample or shard. A set is corrupt when any shard is
missing, has another size or sha256 than the manifest says, holds another number of samples, or any
sample is unreadable, has codes out of range or of another shape than its shard's bucket grid
(the square grid in format /1) or dtype, or has text ids outside the text vocabulary.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter

import numpy as np

from megatron_ts import storage
from megatron_ts.buckets import SQUARE
from megatron_ts.data.manifest import load_manifest

FIELDS = ("codes.npy", "ids.npy", "txt", "json")


def _side_bin(side: int) -> str:
    for edge in (256, 512, 1024, 2048, 4096):
        if side < edge:
            return f"<{edge}"
    return ">=4096"


def _check_sample(
    key: str, members: dict[str, bytes], shape: tuple[int, int], codebook: int, text: int
):
    """Returns (problem or None, caption chars, caption ids, max code); `shape` is (rows, cols)."""
    missing = [f for f in FIELDS if f not in members]
    if missing:
        return f"missing member {key}.{missing[0]}", 0, 0, -1
    try:
        codes = np.load(io.BytesIO(members["codes.npy"]), allow_pickle=False)
        ids = np.load(io.BytesIO(members["ids.npy"]), allow_pickle=False)
        caption = members["txt"].decode("utf-8")
    except Exception as exc:  # noqa: BLE001 - any failure makes the sample unreadable
        return f"unreadable: {type(exc).__name__}: {exc}", 0, 0, -1
    if codes.dtype != np.uint16 or codes.shape != tuple(shape):
        return f"codes {codes.dtype} {codes.shape}, expected uint16 {tuple(shape)}", 0, 0, -1
    top = int(codes.max()) if codes.size else -1
    if top >= codebook:
        return f"code {top} >= codebook size {codebook}", 0, 0, top
    if ids.dtype != np.int32 or ids.ndim != 1:
        return f"ids {ids.dtype} {ids.shape}, expected 1-D int32", 0, 0, top
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= text):
        return f"text id {int(ids.max())} outside [0, {text})", 0, 0, top
    return None, len(caption), int(ids.size), top


def inspect(url: str, endpoint_url: str | None = None, verify_sha: bool = True) -> dict:
    """Reads the whole set; returns the report (`corrupt` is True when anything is wrong)."""
    manifest = load_manifest(url, endpoint_url)
    base = manifest.base_url()
    codebook, text, grid = manifest.codebook_size, manifest.vocab.text_size, manifest.grid
    bad_samples: list[dict] = []
    bad_shards: list[dict] = []
    res_hist: Counter = Counter()
    # readable samples per bucket, in the manifest's bucket order ("1:1" alone in format /1)
    bucket_hist = dict.fromkeys(manifest.bucket_samples, 0)
    chars, n_ids = [], []
    code_max = -1
    counted = 0
    for entry in manifest.shards:
        shard_url = base + entry.name
        try:
            raw = storage.read_bytes(shard_url, endpoint_url)
        except (FileNotFoundError, OSError) as exc:
            bad_shards.append({"shard": entry.name, "problem": f"unreadable: {exc}"})
            continue
        if len(raw) != entry.bytes:
            bad_shards.append(
                {"shard": entry.name, "problem": f"{len(raw)} bytes, manifest says {entry.bytes}"}
            )
        elif verify_sha and hashlib.sha256(raw).hexdigest() != entry.sha256:
            bad_shards.append({"shard": entry.name, "problem": "sha256 differs from the manifest"})
        shape = manifest.bucket_grid(entry.bucket)
        bucket_name = entry.bucket or SQUARE
        samples: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    base_name = info.name.rsplit("/", 1)[-1]
                    key, _, suffix = base_name.partition(".")
                    samples.setdefault(key, {})[suffix] = tar.extractfile(info).read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            bad_shards.append({"shard": entry.name, "problem": f"truncated or corrupt tar: {exc}"})
        for key, members in samples.items():
            problem, n_chars, n_tok, top = _check_sample(key, members, shape, codebook, text)
            code_max = max(code_max, top)
            if problem:
                bad_samples.append({"shard": entry.name, "key": key, "problem": problem})
                continue
            chars.append(n_chars)
            n_ids.append(n_tok)
            bucket_hist[bucket_name] += 1
            try:
                meta = json.loads(members["json"])
                side = min(int(meta["original_width"]), int(meta["original_height"]))
                res_hist[_side_bin(side)] += 1
            except (ValueError, KeyError, TypeError):
                res_hist["unknown"] += 1
        if len(samples) != entry.samples:
            bad_shards.append(
                {
                    "shard": entry.name,
                    "problem": f"{len(samples)} samples, manifest says {entry.samples}",
                }
            )
        counted += len(samples)

    def stats(values: list[int]) -> dict:
        if not values:
            return {}
        a = np.asarray(values)
        return {
            "min": int(a.min()),
            "mean": round(float(a.mean()), 2),
            "p50": int(np.percentile(a, 50)),
            "p95": int(np.percentile(a, 95)),
            "max": int(a.max()),
        }

    return {
        "url": manifest.url,
        "resolution": manifest.resolution,
        "grid": grid,
        "codebook_size": codebook,
        "text_size": text,
        "shards": len(manifest.shards),
        "manifest_samples": manifest.total_samples,
        "samples_read": counted,
        "readable_samples": len(chars),
        "original_short_side_histogram": dict(sorted(res_hist.items())),
        "buckets": (None if manifest.buckets is None else [b.to_dict() for b in manifest.buckets]),
        "bucket_histogram": bucket_hist,
        "caption_chars": stats(chars),
        "caption_ids": stats(n_ids),
        "code_max": code_max,
        "codes_in_range": code_max < codebook,
        "skipped_at_tokenize": manifest.extra.get("skipped", {}),
        "failed_inputs": manifest.extra.get("failed_inputs", []),
        "bad_shards": bad_shards,
        "bad_samples": bad_samples,
        "corrupt": bool(bad_shards or bad_samples),
    }


def _bucket_line(report: dict) -> str:
    """'1:1 32x32: 5, 2:1 48x24: 3' (format /2) or '1:1: 24' (format /1)."""
    sizes = {b["name"]: f" {b['width']}x{b['height']}" for b in report["buckets"] or []}
    return ", ".join(f"{n}{sizes.get(n, '')}: {c}" for n, c in report["bucket_histogram"].items())


def format_report(report: dict) -> str:
    """Human-readable lines of an inspect report."""
    lines = [
        f"{report['url']}: {report['shards']} shards, {report['samples_read']} samples read "
        f"({report['manifest_samples']} in manifest), {report['resolution']} px, grid "
        f"{report['grid']}",
        f"codes: max {report['code_max']} of codebook {report['codebook_size']} "
        f"({'ok' if report['codes_in_range'] else 'OUT OF RANGE'})",
        f"caption chars: {report['caption_chars']}",
        f"caption ids: {report['caption_ids']}",
        f"original short side: {report['original_short_side_histogram']}",
        f"buckets (readable samples): {_bucket_line(report)}",
    ]
    if report["skipped_at_tokenize"]:
        lines.append(f"skipped when tokenizing: {report['skipped_at_tokenize']}")
    for item in report["failed_inputs"]:
        lines.append(f"unreadable input shard: {item}")
    for item in report["bad_shards"]:
        lines.append(f"BAD SHARD {item['shard']}: {item['problem']}")
    for item in report["bad_samples"]:
        lines.append(f"BAD SAMPLE {item['shard']} {item['key']}: {item['problem']}")
    lines.append("CORRUPT" if report["corrupt"] else "OK")
    return "\n".join(lines)
