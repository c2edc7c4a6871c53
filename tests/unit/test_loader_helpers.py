"""Writes small token-shard sources (tar + manifest.json) for the loader tests.

The format is the one `ts-data tokenize` writes: members KEY.codes.npy (uint16 [G, G]),
KEY.ids.npy (int32 caption ids), KEY.txt, KEY.json; a manifest lists the shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np

from megatron_ts.config import DataConfig, ResolvedStage, SourceConfig
from megatron_ts.vocab import VocabLayout

VOCAB = VocabLayout(text_size=256, codebook_size=512)
GRID = 4
DOWNSAMPLE = 16


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def sample_members(
    key: str, index: int, grid: int = GRID, vocab: VocabLayout = VOCAB
) -> dict[str, bytes]:
    """Members of one sample; codes and ids encode `index` so tests can check the content."""
    rng = np.random.default_rng(index)
    codes = rng.integers(0, vocab.codebook_size, size=(grid, grid)).astype(np.uint16)
    codes[0, 0] = index % vocab.codebook_size
    ids = rng.integers(0, vocab.text_size, size=int(rng.integers(1, 12))).astype(np.int32)
    return {
        "codes.npy": _npy(codes),
        "ids.npy": _npy(ids),
        "txt": f"caption {index}".encode(),
        "json": json.dumps({"index": index}).encode(),
    }


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """Writes a POSIX tar of samples and returns its bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(raw)
    return raw


def shard_entry(name: str, raw: bytes, samples: int, **extra) -> dict:
    """The manifest entry of a shard written as `raw` (name, samples, bytes, sha256, extra)."""
    return {
        "name": name,
        "samples": samples,
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        **extra,
    }


def write_source(
    root: Path,
    *,
    shards: int,
    per_shard: int,
    name: str = "src",
    grid: int = GRID,
    vocab: VocabLayout = VOCAB,
    corrupt: dict[str, dict[str, bytes]] | None = None,
) -> Path:
    """Writes `shards` tars of `per_shard` samples and a manifest under root/name.

    Args:
        corrupt: key -> replacement members for samples that should be corrupt.

    Returns:
        The source directory.
    """
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(shards):
        samples = []
        for j in range(per_shard):
            key = f"{name}-{s:03d}-{j:04d}"
            members = sample_members(key, s * per_shard + j, grid, vocab)
            if corrupt and key in corrupt:
                members = corrupt[key]
            samples.append((key, members))
        shard = f"shard-{s:05d}.tar"
        entries.append(shard_entry(shard, write_tar(out / shard, samples), per_shard))
    manifest = {
        "format": "megatron_ts.tokens/1",
        "resolution": grid * DOWNSAMPLE,
        "grid": grid,
        "downsample": DOWNSAMPLE,
        "vocab": vocab.to_dict(),
        "vq": {"format": "native"},
        "text_tokenizer": {"name": "byte"},
        "shards": entries,
        "total_samples": shards * per_shard,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def make_stage(
    sources: list[tuple[str, float]],
    *,
    micro_batch: int = 4,
    caption_len: int = 8,
    grid: int = GRID,
    index: int = 0,
) -> ResolvedStage:
    return ResolvedStage(
        index=index,
        name=f"stage{index}",
        resolution=grid * DOWNSAMPLE,
        shuffle_window=1,
        sources=tuple(SourceConfig(url=u, weight=w) for u, w in sources),
        global_batch=micro_batch,
        micro_batch=micro_batch,
        caption_len=caption_len,
        steps=10,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=0,
        schedule="constant",
        z_loss=0.0,
        carry_over="weights",
        tensor=1,
        pipeline=1,
    )


def make_data_cfg(**kw) -> DataConfig:
    defaults = dict(caption_dropout=0.0, num_workers=2, shuffle_buffer=8, max_error_rate=0.0)
    defaults.update(kw)
    return DataConfig(**defaults)
