"""Writes safetensors shards tensor by tensor, so memory stays near the largest tensor.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. The format is a
little-endian u64 header length, a JSON header with each tensor's dtype, shape and byte range,
then the raw bytes in header order, so a writer that knows the shapes up front (from the
checkpoint's headers) can stream the bytes as the tensors arrive.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
}


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '1024' -> bytes (decimal units as the HF hub uses)."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def plan_shards(tensors: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Splits tensors, in order, into shards of at most max_shard_bytes (one tensor may exceed)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """Streams one planned shard: `write(name, tensor)` in plan order, then `close()`."""

    def __init__(self, path: Path, plan: list[TensorPlan], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.plan = plan
        self.next = 0
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for t in plan:
            header[t.name] = {
                "dtype": DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.plan[self.next]
        if name != expected.name or tuple(tensor.shape) != expected.shape:
            raise RuntimeError(
                f"{self.path.name}: got {name} {tuple(tensor.shape)}, planned "
                f"{expected.name} {expected.shape}"
            )
        data = tensor.detach().to(device="cpu", dtype=expected.dtype).contiguous()
        # bytes of the tensor in native (little-endian) order, without a numpy bf16 detour
        self.file.write(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.plan):
            self.file.close()
            raise RuntimeError(
                f"{self.path.name}: {len(self.plan) - self.next} tensors not written"
            )
        self.file.close()
        os.replace(self.tmp, self.path)
