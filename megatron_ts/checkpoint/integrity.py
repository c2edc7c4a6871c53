"""The size and sha256 of every file of a checkpoint, recorded at save and checked before use.

A step directory holds `checksums.json`:

    {"format": "megatron_ts.checksums/1",
     "files": {"meta.json": {"bytes": 3589, "sha256": "..."},
               "model/layer_000-tp00.safetensors": {"bytes": 299608, "sha256": "..."}, ...}}

listing every file of the directory except itself and `COMPLETE` (both written after it), by
path relative to the step directory. A flipped bit in a tensor would otherwise load and train on
silently: neither DeepSpeed's pickles nor safetensors carry a checksum. Checkpoints written before
this file existed have none and are read unverified, with a warning.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron_ts.checkpoint.model_files import COMPLETE_FILE, CheckpointError, previous_hint
from megatron_ts.logging import get_logger

log = get_logger(__name__)

CHECKSUMS_FILE = "checksums.json"
CHECKSUMS_FORMAT = "megatron_ts.checksums/1"
_CHUNK = 8 << 20


def file_digest(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of one file, read in 8 MiB chunks."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": sha.hexdigest()}


def list_files(ckpt_dir: Path) -> list[str]:
    """Paths (relative, sorted) of the files a checksums.json of `ckpt_dir` covers."""
    root = Path(ckpt_dir)
    skip = {CHECKSUMS_FILE, COMPLETE_FILE}
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in skip
    )


def write_checksums(ckpt_dir: Path, files: dict[str, dict]) -> Path:
    """Writes checksums.json for the given {relative path: digest} entries."""
    path = Path(ckpt_dir) / CHECKSUMS_FILE
    body = {"format": CHECKSUMS_FORMAT, "files": dict(sorted(files.items()))}
    path.write_text(json.dumps(body, indent=0))
    return path


def read_checksums(ckpt_dir: Path) -> dict[str, dict] | None:
    """The recorded {relative path: digest}, or None for a checkpoint saved without them."""
    path = Path(ckpt_dir) / CHECKSUMS_FILE
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        if body.get("format") != CHECKSUMS_FORMAT:
            raise ValueError(f"format {body.get('format')!r}, expected {CHECKSUMS_FORMAT!r}")
        return {str(k): dict(v) for k, v in body["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"checkpoint file damaged ({path}: {err}): {previous_hint(Path(ckpt_dir))}"
        ) from None


def problems(ckpt_dir: Path, recorded: dict[str, dict], paths: list[str]) -> list[str]:
    """What is wrong with `paths` of `ckpt_dir` against the recorded digests (empty: all good)."""
    found = []
    for rel in paths:
        want = recorded.get(rel)
        path = Path(ckpt_dir) / rel
        if want is None:
            continue
        if not path.is_file():
            found.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            found.append(f"{path} has {size} bytes, {want['bytes']} were saved")
        elif file_digest(path)["sha256"] != want["sha256"]:
            found.append(f"{path} changed since it was saved (sha256 differs)")
    return found


def damaged_error(ckpt_dir: Path, found: list[str]) -> CheckpointError:
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return CheckpointError(
        f"checkpoint damaged: {found[0]}{more}: delete {ckpt_dir} (a run then resumes from the "
        f"previous checkpoint) or {previous_hint(Path(ckpt_dir))}"
    )


def verify(ckpt_dir: Path, under: str | None = None) -> None:
    """Checks the files of `ckpt_dir` (those under `under/` only, if given) in this process.

    Raises:
        CheckpointError: a file missing, of another size or another sha256 than saved.
    """
    recorded = read_checksums(ckpt_dir)
    if recorded is None:
        log.warning("%s has no %s: its files are read unverified", ckpt_dir, CHECKSUMS_FILE)
        return
    paths = [p for p in recorded if under is None or p.startswith(under.rstrip("/") + "/")]
    found = problems(ckpt_dir, recorded, paths)
    if found:
        raise damaged_error(ckpt_dir, found)
