"""Training metrics to TensorBoard, the console and `metrics.jsonl` (rank 0 only).

A step's metrics stay on the device (`StepResult.metrics`) until the trainer reads them: the
steps since the last read come to the host together, in one transfer, at a logging step, before
a checkpoint and at the end of a stage (`PendingSteps`). Steps with no read in between run
without waiting for the device, so the reported step time is the interval's wall time per step.

MFU = model training FLOPs per second per device / the device's peak dense bf16 TFLOP/s.
Model FLOPs come from megatron_ts.models.flops (3x forward, recomputation not counted); the
peak table is below and can be overridden with logging.peak_tflops.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch

from megatron_ts.config import LoggingConfig
from megatron_ts.logging import get_logger

log = get_logger(__name__)

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets (SXM parts).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
}


def device_peak_tflops(cfg: LoggingConfig) -> float | None:
    """Peak TFLOP/s of this rank's device, or None when unknown (CPU without an override)."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    log.warning("no peak TFLOP/s known for %s; set logging.peak_tflops to report MFU", name)
    return None


def peak_memory_gb() -> float:
    """Peak GPU memory allocated, or the process's peak resident set on CPU, in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB


class PendingSteps:
    """Steps whose metrics are still on the device, read together (one device-to-host sync)."""

    def __init__(self):
        self.steps: list[tuple[int, int, object]] = []
        self.seconds = 0.0

    def add(self, global_step: int, stage_step: int, result, seconds: float) -> None:
        """Queues a `StepResult` and the host seconds its `train_step` call took."""
        self.steps.append((global_step, stage_step, result))
        self.seconds += seconds

    def read(self) -> tuple[list[tuple[int, int, object]], float | None]:
        """(global_step, stage_step, result) of the queued steps, their `host` metrics set, and
        the wall seconds per step: the train_step calls plus the wait for the device here."""
        steps, self.steps = self.steps, []
        start = time.perf_counter()
        pending = [r for _, _, r in steps if r.host is None]
        if pending:
            rows = torch.stack([r.metrics for r in pending]).tolist()  # waits for the device
            for result, row in zip(pending, rows, strict=True):
                result.host = row
        seconds = self.seconds + time.perf_counter() - start
        self.seconds = 0.0
        return steps, (seconds / len(steps) if steps else None)


class MetricsWriter:
    """Writes scalars (and preview images) on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, enabled: bool):
        self.enabled = enabled
        self.cfg = cfg
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()

    def scalars(self, step: int, values: dict[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        if self.tb is not None:
            for key, value in clean.items():
                self.tb.add_scalar(key, value, step)
        record = {"step": step, **clean}
        if "train/loss" in clean:
            record["loss"] = clean["train/loss"]  # short key for scripts comparing curves
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if console:
            shown = " ".join(
                f"{k.split('/')[-1]}={v:.4g}" for k, v in clean.items() if not math.isnan(v)
            )
            log.info("step %d %s", step, shown)

    def image(self, tag: str, image_hwc, step: int) -> None:
        """Adds an (H, W, 3) uint8 image to TensorBoard."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
