"""Input shards in img2dataset layout: expanding URL patterns and reading samples from tars.

An input is a local tar, a local directory (its `*.tar`), a brace pattern
(`data/{00000..00099}.tar`, `s3://b/p/{00000..00009}.tar`) or an `s3://bucket/prefix/` (its
`*.tar`). A sample is the group of consecutive tar members sharing a key (the file name up to its
first dot): `KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from braceexpand import braceexpand

from megatron_ts import storage
from megatron_ts.errors import EXIT_USAGE
from megatron_ts.storage import is_s3_url, split_s3_url

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class InputError(ValueError):
    """An input pattern that matches nothing; names the pattern."""

    exit_code = EXIT_USAGE


def expand_inputs(specs: list[str], endpoint_url: str | None = None) -> list[str]:
    """Expands input patterns into a sorted, de-duplicated list of tar URLs.

    Every S3 bucket named is checked once before anything is read, so a mistyped bucket stops
    the command here rather than failing each input shard.

    Raises:
        InputError: a pattern that names no tar.
        megatron_ts.storage.S3BucketNotFoundError: an S3 bucket that does not exist (a
            FileNotFoundError naming the URL).
    """
    urls: list[str] = []
    for spec in specs:
        for item in braceexpand(spec):
            if item.endswith(".tar"):
                urls.append(item)
                continue
            found = (
                storage.list_prefix(item, endpoint_url, ".tar")
                if is_s3_url(item)
                else sorted(str(p) for p in Path(item).glob("*.tar"))
            )
            if not found:
                raise InputError(
                    f"input {item!r} is neither a .tar nor a directory/prefix holding .tar "
                    "shards; check the path or URL"
                )
            urls += found
    checked: set[str] = set()
    for url in urls:
        if is_s3_url(url) and split_s3_url(url)[0] not in checked:
            storage.check_bucket(url, endpoint_url)
            checked.add(split_s3_url(url)[0])
    return sorted(set(urls))


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)

    def image_member(self) -> tuple[str, bytes] | None:
        for ext in IMAGE_EXTS:
            if ext in self.members:
                return ext, self.members[ext]
        return None


@dataclass
class ShardReadError:
    """A tar that broke off: the key being read (or None) and the error."""

    key: str | None
    error: str


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    prefix = name[: len(name) - len(base)]
    if "." not in base:
        return prefix + base, ""
    stem, ext = base.split(".", 1)
    return prefix + stem, ext.lower()


class _Counted(io.RawIOBase):
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, inner: BinaryIO):
        self.inner, self.count = inner, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.inner.readinto(buf)
        self.count += n
        return n

    def close(self) -> None:
        self.inner.close()
        super().close()


def iter_samples(url: str, endpoint_url: str | None = None) -> Iterator[RawSample | ShardReadError]:
    """Samples of one input tar in order; a truncated or corrupt tar ends with a ShardReadError.

    Raises:
        FileNotFoundError, OSError: the shard cannot be opened at all.
        storage.StorageError: an S3 read still failing after its retries (not a truncation: the
            caller fails the input so that a re-run retries it).
    """
    stream = _Counted(storage.open_url(url, endpoint_url))
    current: RawSample | None = None
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
        except storage.StorageError:
            raise
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield ShardReadError(None, f"not a readable tar: {exc}")
            return
        try:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _split_name(info.name)
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key)
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise EOFError(
                        f"member {info.name} truncated ({len(data)} of {info.size} bytes)"
                    )
                current.members[ext] = data
            # tarfile ends quietly when the file stops right before a member header; a whole tar
            # has its end-of-archive zero block there (uncompressed tars only: offsets differ)
            if tar.fileobj.comptype == "tar":
                while stream.read(1 << 20):
                    pass
                if stream.count < tar.offset + tarfile.BLOCKSIZE:
                    raise EOFError(
                        f"the tar stops at byte {stream.count} without its end-of-archive block"
                    )
        except storage.StorageError:
            raise  # the store failed after its retries: the shard is not truncated, retry later
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield ShardReadError(current.key if current else None, f"truncated or corrupt: {exc}")
            return
        if current is not None:
            yield current
    finally:
        stream.close()
