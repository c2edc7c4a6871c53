"""The GPU check: the CUDA path run and measured in one go, in a time budget (docs/gpu.md).

    bash scripts/gpu_check.sh [--out DIR] [--budget 465] [--only train,sampling] [--layers N]
    bash scripts/gpu_check.sh --smoke [--out DIR]     # the same on CPU at tiny sizes (CI)

Sections, each in its own process with its own time limit (an overrun or a crash costs that
section only; what it measured before stays in the report):

    env         versions, imports of the carried packages, DeepSpeed's accelerator, bf16 matmul
    tests       tests/gpu (SDPA flash kernel, bf16 vs fp32, engine on CUDA vs CPU, sampling, VQ)
    train       ts-train under torchrun on one device (NCCL, DeepSpeed, ZeRO-1, bf16): killed in
                its step-4 save, resumed from step 2; steps 3-4 must repeat their losses
    throughput  the 2.7B width at 1024 px, s = 2, 1, 4 (bf16, selective recompute): step time,
                images/s, TFLOP/s, MFU, peak memory, a profile of the top kernels; the largest
                2048 px s = 2 micro-batch that fits
    sampling    the 2.7B width at 1024 px, s = 2 and 1, KV cache, guidance: s/image at batch 1, 8
    tokenize    `ts-data tokenize` with LlamaGen's VQ-16 (random weights) at 512 and 1024 px

Writes DIR/gpu_check.json (everything), DIR/gpu_check.md (the tables for docs/benchmarks.md)
and DIR/gpu_check.log (every section's output); both reports are rewritten after each section.
Exit status: 0 when every section passed, 1 when one failed or ran out of time, 2 usage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]

SECTIONS = {"env": 15, "tests": 60, "train": 60, "throughput": 220, "sampling": 80, "tokenize": 30}
"""Section -> seconds it may take on the GPU machine (465 s in all; --smoke allows 5x each)."""

SIZES = {
    "gpu": {
        "flavor": "2.7B", "layers": 20, "resolution": 1024, "downsample": 16, "codebook": 16384,
        "text_size": 32000, "caption_len": 128, "checkpointing": "selective",
        "windows": [2, 1, 4], "micro_batch": {1: 4, 2: 8, 4: 16}, "warmup": 2, "steps": 5,
        "big_resolution": 2048, "big_max": 64, "big_seconds": 30,
        "sample_resolution": 1024, "sample_windows": [2, 1], "sample_batches": [1, 8],
        "tokenize_resolutions": [512, 1024], "tokenize_images": 64, "workers": 8,
        "matmul": 8192, "train_steps": 4,
    },
    "smoke": {
        "flavor": "debug", "layers": None, "resolution": 64, "downsample": 8, "codebook": 512,
        "text_size": 256, "caption_len": 16, "checkpointing": "selective",
        "windows": [2, 1, 4], "micro_batch": {1: 2, 2: 4, 4: 8}, "warmup": 1, "steps": 2,
        "big_resolution": 128, "big_max": 8, "big_seconds": 60,
        "sample_resolution": 64, "sample_windows": [2, 1], "sample_batches": [1, 2],
        "tokenize_resolutions": [64, 128], "tokenize_images": 8, "workers": 2,
        "matmul": 512, "train_steps": 4,
    },
}  # fmt: skip

TARGETS = [
    ("MFU, 2.7B width, 1024 px, s = 2", 0.45),
    ("training images/s, s = 2 over s = 1", 3.5),
    ("sampling s/image, s = 1 over s = 2 (batch 1)", 3.5),
]
MFU_PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16 datasheet figure, as issue and docs use


# ------------------------------------------------------------------------------------------------
# Inside a section's process
# ------------------------------------------------------------------------------------------------


class Section:
    """What one section reports: a dict rewritten to its result file after every change."""

    def __init__(self, path: Path, mode: str, work: Path, deadline: float, layers: int | None):
        self.path, self.mode, self.work, self.deadline = path, mode, work, deadline
        self.size = dict(SIZES[mode])
        if layers:
            self.size["layers"] = layers
        self.data: dict = {"failures": []}

    def left(self) -> float:
        return self.deadline - time.time()

    def emit(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def append(self, key: str, value) -> None:
        self.emit(key, [*self.data.get(key, []), value])

    def fail(self, what: str) -> None:
        print(f"FAILED: {what}", flush=True)
        self.append("failures", what)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free_memory() -> float | None:
    """Runs the garbage collector, empties the CUDA cache; GiB still allocated (None on CPU)."""
    import gc

    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return round(torch.cuda.memory_allocated() / 2**30, 2)


def profile_summary(fn, rows: int = 12) -> dict:
    """Runs fn once under torch.profiler: its wall time, the summed self time of the device's
    kernels (CUDA) or of the CPU ops, and the `rows` ops/kernels with the most self time.

    busy_ms well below wall_ms on CUDA means the host (Python, launches, syncs) is the limit.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        _sync()
        wall = time.perf_counter() - t0
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: -getattr(e, attr))
    top = [
        {
            "name": e.key[:90],
            "calls": e.count,
            "ms": round(getattr(e, attr) / 1000, 3),
            "share": round(getattr(e, attr) / total, 4),
        }
        for e in events[:rows]
    ]
    return {"wall_ms": round(wall * 1000, 1), "busy_ms": round(total / 1000, 1),
            "clock": "device" if cuda else "cpu", "top": top}  # fmt: skip


def _unmet_requirements() -> list[str]:
    """Requirements of megatron_ts and of the carried packages that what is importable here does
    not meet (a notice: the check runs on the machine's stack as it is)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    manifest = Path(os.environ.get("TS_GPU_WHEELS", ROOT / ".gpu-wheels")) / "manifest.json"
    names = ["megatron_ts"]
    if manifest.exists():
        names += [w["name"] for w in json.loads(manifest.read_text())["wheels"]]
    unmet = []
    for name in names:
        try:
            specs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # megatron_ts runs from the checkout, not installed
        for spec in specs:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                unmet.append(f"{name}: {req} (not installed)")
                continue
            if not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{name}: {req} ({have} installed)")
    return unmet


def section_env(sec: Section) -> None:
    import importlib
    from importlib import metadata

    import torch

    cuda = torch.cuda.is_available()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if cuda
        else None,
        "cpus": os.cpu_count(),
        "ds_accelerator_env": os.environ.get("DS_ACCELERATOR"),
    }
    if cuda:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        info["driver"] = smi.stdout.strip() or None
    sec.emit("machine", info)
    versions = {}
    for name in ("deepspeed", "megatron-core", "transformers", "tokenizers", "numpy", "triton",
                 "flash-attn", "webdataset", "boto3", "safetensors", "pillow", "tensorboard"):  # fmt: skip
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    sec.emit("packages", versions)
    imports = {}
    for module in ("deepspeed", "megatron.core", "webdataset", "boto3", "hjson", "braceexpand",
                   "megatron_ts.training.trainer", "megatron_ts.hf.modeling_token_shuffle",
                   "data_tools.tokenize"):  # fmt: skip
        try:
            importlib.import_module(module)
            imports[module] = "ok"
        except Exception as err:  # noqa: BLE001 - reported, the check goes on
            imports[module] = f"{type(err).__name__}: {err}"
            sec.fail(f"import {module}: {err}")
    sec.emit("imports", imports)
    sec.emit("unmet_requirements", _unmet_requirements())
    if imports["deepspeed"] == "ok":
        from deepspeed.accelerator import get_accelerator

        sec.emit("ds_accelerator", get_accelerator()._name)
    from megatron_ts.models.attention import resolve_backend

    sec.emit("attention_backend", resolve_backend("auto"))
    n = sec.size["matmul"]
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device="cuda" if cuda else "cpu", dtype=dtype)
    for _ in range(3):
        a @ a
    _sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    _sync()
    tflops = 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12
    sec.emit(
        "matmul", {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": round(tflops, 1)}
    )


def section_tests(sec: Section) -> None:
    import xml.etree.ElementTree as ET

    junit = sec.work / "tests.xml"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    if sec.mode == "smoke":
        env.update(TS_GPU_TESTS_ON_CPU="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
         f"--junitxml={junit}", "tests/gpu"],
        cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    rows = []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    message = (node.get("message") or "")[:300]
            rows.append({
                "test": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                "outcome": outcome, "seconds": round(float(case.get("time") or 0), 2),
                "message": message,
            })  # fmt: skip
    sec.emit("tests", rows)
    if proc.returncode not in (0, 5) or not rows:
        sec.fail(f"pytest tests/gpu exited {proc.returncode}")


def _losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def section_train(sec: Section) -> None:
    """ts-train through torchrun on one device; a kill in the last save, then an exact resume."""
    import re

    import torch

    size = sec.size
    steps = size["train_steps"]
    run_dir = sec.work / "train-run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "pretrain.train", "--config", "pretrain/configs/debug.toml",
        "--job.run_dir", str(run_dir), "--train.steps", str(steps),
        "--checkpoint.interval_steps", str(steps // 2), "--parallel.zero_stage", "1",
        "--data.num_workers", "0", "--logging.interval", "1",
    ]  # fmt: skip
    if torch.cuda.is_available():
        cmd += ["--train.precision", "bf16"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if sec.mode == "smoke":
        env["DS_ACCELERATOR"] = "cpu"

    def launch(extra_env: dict) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            cmd, cwd=ROOT, env={**env, **extra_env}, capture_output=True, text=True, check=False
        )
        sys.stdout.write(proc.stdout[-4000:])
        sys.stdout.write(proc.stderr[-12000:])
        return proc

    # tests/hooks/sitecustomize.py kills the process in its step-N save (no hook in the package)
    hooks = os.pathsep.join(filter(None, [str(ROOT / "tests/hooks"), env.get("PYTHONPATH")]))
    first = launch({"MEGATRON_TS_KILL_IN_SAVE": str(steps), "PYTHONPATH": hooks})
    ckpts = run_dir / "checkpoints"
    latest = (ckpts / "latest").read_text().strip() if (ckpts / "latest").exists() else None
    before = _losses(run_dir)
    up = re.search(
        r"torch\.distributed up: backend=(\w+) world=(\d+) deepspeed_accelerator=(\w+)",
        first.stdout + first.stderr,
    )
    info = {
        "command": " ".join(cmd[1:]),
        "first_exit": first.returncode,
        "latest_after_kill": latest,
        "backend": up.group(1) if up else None,
        "world": int(up.group(2)) if up else None,
        "ds_accelerator": up.group(3) if up else None,
        "precision": "bf16" if torch.cuda.is_available() else "fp32",
        "losses_first": before,
    }
    sec.emit("train", info)
    expected = f"step_{steps // 2:08d}"
    if first.returncode == 0 or latest != expected or len(before) != steps:
        sec.fail(f"the killed run: exit {first.returncode}, latest {latest}, {len(before)} losses")
        return
    second = launch({})
    after = _losses(run_dir)
    resumed = {s: after.get(s) for s in range(steps // 2 + 1, steps + 1)}
    diffs = [abs(resumed[s] - before[s]) for s in resumed if resumed[s] is not None]
    info.update(
        second_exit=second.returncode,
        resumed_from=expected if "resuming from" in second.stderr else None,
        losses_resumed=resumed,
        max_abs_diff=max(diffs) if len(diffs) == len(resumed) else None,
    )
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1] if metrics else {}
    info["last_metrics"] = {k: last.get(k) for k in ("tokens_per_s", "peak_memory_gb", "grad_norm")}
    sec.emit("train", info)
    if second.returncode != 0 or info["resumed_from"] is None:
        sec.fail(f"the resumed run: exit {second.returncode}, resumed from {info['resumed_from']}")
    elif resumed[steps // 2 + 1] != before[steps // 2 + 1]:
        # The first step after the resume is a forward pass on the restored weights and data:
        # equal bits, or the restore is not exact. Later steps may differ by the device's
        # non-deterministic backward kernels (atomics), within 0.1%.
        sec.fail(f"first resumed step's loss {resumed} differs from {before}")
    elif info["max_abs_diff"] is None or info["max_abs_diff"] > 1e-3 * max(before.values()):
        sec.fail(f"resumed losses {resumed} differ from {before} by more than 0.1%")
    cuda = torch.cuda.is_available()
    if (info["backend"], info["ds_accelerator"]) != (("nccl", "cuda") if cuda else ("gloo", "cpu")):
        sec.fail(f"backend {info['backend']}, DeepSpeed accelerator {info['ds_accelerator']}")


def _bench(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return __import__(name)


def _train_case(sec: Section, engine, spec, stage, cfg, window: int, resolution: int, mb: int):
    """Times `steps` steps after warm-up at micro-batch mb (halved on out-of-memory)."""
    import torch

    bench = _bench("bench_train")
    size = sec.size
    grid = resolution // size["downsample"]
    row: dict = {"s": window, "resolution": resolution, "layers": spec.shape.num_layers}
    while True:
        batches = bench.random_batches(mb, size["caption_len"], size["text_size"],
                                       size["codebook"], grid)  # fmt: skip
        try:
            step_s = bench.timed_steps(engine, batches, size["warmup"], size["steps"])
            break
        except torch.OutOfMemoryError:
            if mb == 1:
                raise
        # outside the except block, so that its traceback no longer holds the activations
        row.setdefault("out_of_memory_at", []).append(mb)
        _free_memory()
        mb //= 2
    from megatron_ts.training.metrics import peak_memory_gb

    flops = bench.train_flops_per_image(spec, cfg, grid, window)
    positions = stage.seq_len(size["downsample"]) if resolution == size["resolution"] else None
    tflops = flops * mb / step_s / 1e12
    row.update(
        micro_batch=mb, positions=positions, step_s=round(step_s, 4),
        images_per_s=round(mb / step_s, 3), tflops=round(tflops, 2),
        mfu=round(tflops / MFU_PEAK_TFLOPS, 4) if sec.mode == "gpu" else None,
        peak_memory_gib=round(peak_memory_gb(), 2), train_flops_per_image=flops,
    )  # fmt: skip
    row["profile"] = profile_summary(lambda: engine.train_step(batches))
    return row


def _largest_micro_batch(sec: Section, engine, window: int, resolution: int) -> dict:
    """Doubles the micro-batch until a step runs out of memory, then bisects: the largest that
    ran one full optimizer step (forward, backward, step) at `resolution`, searched for at most
    `big_seconds` (the other windows' cases come after it)."""
    import torch

    bench = _bench("bench_train")
    size = sec.size
    grid = resolution // size["downsample"]
    deadline = min(sec.deadline, time.time() + size["big_seconds"])

    def fits(mb: int) -> bool:
        batches = bench.random_batches(mb, size["caption_len"], size["text_size"],
                                       size["codebook"], grid)  # fmt: skip
        try:
            engine.train_step(batches)
            _sync()
            return True
        except torch.OutOfMemoryError:
            pass
        _free_memory()  # outside the except block: its traceback holds the activations
        return False

    good, bad, mb, stopped = 0, None, 1, None
    while mb <= size["big_max"]:
        if time.time() > deadline:
            stopped = "time"
            break
        if not fits(mb):
            bad = mb
            break
        good, mb = mb, mb * 2
    while bad is not None and bad - good > 1:
        if time.time() > deadline:
            stopped = "time"
            break
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return {"s": window, "resolution": resolution, "largest_micro_batch": good,
            "first_out_of_memory": bad, "cap": size["big_max"], "stopped": stopped}  # fmt: skip


def section_throughput(sec: Section) -> None:
    import torch

    bench = _bench("bench_train")
    size = sec.size
    args = SimpleNamespace(**{k: size[k] for k in (
        "flavor", "layers", "codebook", "downsample", "resolution", "caption_len",
        "checkpointing", "text_size")}, micro_batch=1)  # fmt: skip
    rows = []
    per_case = 0.0  # the longest case so far (engine build + timed steps + profile)
    for window in size["windows"]:
        if sec.left() < 1.2 * per_case:
            sec.append(
                "skipped", f"s={window}: {sec.left():.0f} s left, a case took {per_case:.0f}"
            )
            continue
        t0 = time.time()
        try:
            engine, spec, stage, cfg = bench.build_engine(args, window, size["micro_batch"][window])
            build_s = time.time() - t0
            row = _train_case(sec, engine, spec, stage, cfg, window, size["resolution"],
                              size["micro_batch"][window])  # fmt: skip
            row["build_s"] = round(build_s, 1)
            rows.append(row)
            sec.emit("throughput", rows)
            per_case = max(per_case, time.time() - t0)
            if window == 2:  # the same engine: nothing in it depends on the resolution
                big = _largest_micro_batch(sec, engine, window, size["big_resolution"])
                sec.emit("largest_micro_batch", big)
        except Exception as err:  # noqa: BLE001 - one case failing must not hide the others
            import traceback

            traceback.print_exc()
            sec.fail(f"throughput s={window}: {type(err).__name__}: {str(err)[:300]}")
        finally:
            engine = None  # noqa: F841 - drop the engine before the next one is built
            left = _free_memory()
            if left is not None:
                sec.append("memory_after_case_gib", left)
    by_s = {r["s"]: r for r in rows}
    if 1 in by_s and 2 in by_s:
        sec.emit("speedup_s2_over_s1", round(by_s[2]["images_per_s"] / by_s[1]["images_per_s"], 2))
        sec.emit(
            "flops_ratio_s1_over_s2",
            round(by_s[1]["train_flops_per_image"] / by_s[2]["train_flops_per_image"], 2),
        )
    if torch.cuda.is_available():
        sec.emit("peak_tflops_for_mfu", MFU_PEAK_TFLOPS)


class _StepClock:
    """sample_codes' progress hook: counts decoding steps; stops the decode (raises Stop) past a
    deadline or after max_steps."""

    class Stop(Exception):
        pass

    def __init__(self, deadline: float = float("inf"), max_steps: int | None = None):
        self.deadline, self.max_steps, self.times = deadline, max_steps, []

    @property
    def steps(self) -> int:
        return len(self.times)

    def update(self, n: int) -> None:
        _sync()
        self.times.append(time.perf_counter())  # the first: after the prompt and first window
        if self.steps > 1 and (self.times[-1] > self.deadline or self.steps == self.max_steps):
            raise self.Stop

    def extrapolate(self, steps: int) -> float:
        """Seconds from the first update to the last of `steps`, from the measured step times.

        A step attends over a cache that grows by one window, so its time may grow with its
        index: the line through the mean step time of the first and of the second half of the
        measured steps, its slope clamped at >= 0 (a falling slope is warm-up or noise), gives
        the mean over all `steps - 1` intervals.
        """
        d = [b - a for a, b in zip(self.times, self.times[1:])]
        half = len(d) // 2
        mean = sum(d) / len(d)
        if half < 2:
            return (steps - 1) * mean
        m1, m2 = sum(d[:half]) / half, sum(d[half:]) / (len(d) - half)
        x1, x2 = (half + 1) / 2, (half + 1 + len(d)) / 2  # centres of the halves (1-based)
        slope = max(0.0, (m2 - m1) / (x2 - x1))
        x = (len(d) + 1) / 2  # where `mean` sits
        return (steps - 1) * (mean + slope * (steps / 2 - x))


def timed_decode(bench, model, res: int, batch: int, device: str, budget: float) -> dict:
    """bench_sampling's case (KV cache, guidance) for `batch` images, stopped after `budget`
    seconds: then the time is the prompt and first window as measured plus the remaining steps
    extrapolated from the measured ones (`estimated`, with `measured_steps`)."""
    clock = _StepClock(time.perf_counter() + budget)
    t0 = time.perf_counter()
    try:
        row = bench.run_case(model, res, True, device, 0, batch=batch, progress=clock)
        row["measured_steps"] = row["steps"]
        return row
    except _StepClock.Stop:
        pass
    seconds = time.perf_counter() - t0
    steps = model.config.image_positions(res)
    total = (clock.times[0] - t0) + clock.extrapolate(steps)
    return {
        "resolution": res, "s": model.config.shuffle_window, "kv_cache": True, "batch": batch,
        "steps": steps, "s_per_image": round(total / batch, 3),
        "steps_per_s": round(steps / total, 1), "estimated": True,
        "measured_steps": clock.steps, "measured_s": round(seconds, 1),
    }  # fmt: skip


def section_sampling(sec: Section) -> None:
    import torch

    bench = _bench("bench_sampling")
    size = sec.size
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    res = size["sample_resolution"]
    cases = [(s, b) for s in size["sample_windows"] for b in size["sample_batches"]]
    rows = []
    models: dict = {}
    for i, (s, batch) in enumerate(cases):
        if s not in models:
            models.clear()
            _free_memory()
            models[s] = bench.build(size["flavor"], s, res, size["text_size"], size["codebook"],
                                    device, dtype)  # fmt: skip
            bench.run_case(models[s], 64 * s, True, device, 0)  # warm-up at a small size
        budget = max(5.0, (sec.left() - 10) / (len(cases) - i))
        row = timed_decode(bench, models[s], res, batch, device, budget)
        row.update(dtype=str(dtype).removeprefix("torch."), cfg=7.5, top_k=1000,
                   flavor=size["flavor"])  # fmt: skip
        rows.append(row)
        sec.emit("sampling", rows)
        print(f"sampling s={s} batch={batch}: {row['s_per_image']} s/image", flush=True)
    by = {(r["s"], r["batch"]): r for r in rows}
    if (1, 1) in by and (2, 1) in by:
        sec.emit("speedup_s2_over_s1",
                 round(by[(1, 1)]["s_per_image"] / by[(2, 1)]["s_per_image"], 2))  # fmt: skip
    # Where a decoding step's time goes: the prompt and 16 steps at the last window, batch 1.
    if models and sec.left() > 15:
        (model,) = models.values()

        def sixteen_steps():
            try:
                bench.run_case(model, res, True, device, 0, progress=_StepClock(max_steps=16))
            except _StepClock.Stop:
                pass

        sec.emit("profile_s", model.config.shuffle_window)
        sec.emit("profile", profile_summary(sixteen_steps))


def section_tokenize(sec: Section) -> None:
    import torch

    bench = _bench("bench_tokenize")
    from megatron_ts.hf.tokenization_token_shuffle import load_text_tokenizer
    from megatron_ts.hf.vq_token_shuffle import load_vq

    size = sec.size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    text = load_text_tokenizer("byte")
    vq = load_vq("llamagen", bench.random_vq16(sec.work), device)
    rows = []
    for res in size["tokenize_resolutions"]:
        if sec.left() < 10:
            sec.append("skipped", f"{res} px: time")
            continue
        raw = bench.make_inputs(sec.work, size["tokenize_images"], res)
        batch = bench.VQ16_BATCH.get(res, 4)
        runs = []
        for rep in range(3):  # a warm-up, then two timed runs
            out = sec.work / f"tok-{res}-{rep}"
            runs.append(bench.run_once(raw, out, vq, text, res, batch, size["workers"], device))
        best = max(runs[1:], key=lambda r: r["images_per_s"])
        rows.append({"vq": "VQ-16 (random)", "px": res, "batch": batch, "images": best["images"],
                     "images_per_s": round(best["images_per_s"], 2),
                     "ms_per_image": {k: round(v, 2) for k, v in best["ms_per_image"].items()}})  # fmt: skip
        sec.emit("tokenize", rows)


SECTION_FUNCS = {
    "env": section_env,
    "tests": section_tests,
    "train": section_train,
    "throughput": section_throughput,
    "sampling": section_sampling,
    "tokenize": section_tokenize,
}


def run_section(args) -> int:
    sec = Section(Path(args.result), args.mode, Path(args.work), args.deadline, args.layers)
    sec.emit("failures", [])
    try:
        SECTION_FUNCS[args.section](sec)
    except Exception as err:  # noqa: BLE001 - the report names it; the log has the traceback
        import traceback

        traceback.print_exc()
        sec.fail(f"{type(err).__name__}: {str(err)[:300]}")
    return 1 if sec.data["failures"] else 0


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------


def targets(report: dict) -> list[dict]:
    """The issue's H200 targets against what was measured (met is None in smoke mode)."""
    sections = report["sections"]

    def result(name: str) -> dict:
        return sections.get(name, {}).get("result", {})

    through = {r["s"]: r for r in result("throughput").get("throughput", [])}
    values = [
        through.get(2, {}).get("mfu"),
        result("throughput").get("speedup_s2_over_s1"),
        result("sampling").get("speedup_s2_over_s1"),
    ]
    rows = []
    for (name, goal), value in zip(TARGETS, values, strict=True):
        met = None if report["mode"] == "smoke" or value is None else value >= goal
        rows.append({"target": name, "goal": goal, "value": value, "met": met})
    return rows


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if spec else str(value)


def _profile_table(title: str, prof: dict, n: int = 8) -> list[str]:
    """Markdown lines: the title with busy and wall time, then the top ops/kernels."""
    out = ["", f"{title}: {prof['clock']} busy {prof['busy_ms']} ms of {prof['wall_ms']} ms "
           "wall; most self time:", "", "| op / kernel | calls | ms | share |", "|---|---|---|---|"]  # fmt: skip
    for r in prof["top"][:n]:
        name = r["name"].replace("|", "/")
        out.append(f"| `{name}` | {r['calls']} | {r['ms']} | {r['share']:.1%} |")
    return out


def render_markdown(report: dict) -> str:
    """docs/benchmarks.md tables from a gpu_check.json report."""
    secs = report["sections"]
    env = secs.get("env", {}).get("result", {})
    machine = env.get("machine", {})
    pk = env.get("packages", {})
    out = [
        f"### GPU check, {report['started'][:10]} ({report['mode']})",
        "",
        f"Machine: {machine.get('device', 'n/a')}, driver {machine.get('driver', 'n/a')}, "
        f"{machine.get('cpus', 'n/a')} CPUs; Python {machine.get('python', 'n/a')}, torch "
        f"{machine.get('torch', 'n/a')} (CUDA {machine.get('cuda_runtime', 'n/a')}), DeepSpeed "
        f"{pk.get('deepspeed', 'n/a')}, megatron-core {pk.get('megatron-core', 'n/a')}, "
        f"transformers {pk.get('transformers', 'n/a')}, flash-attn {pk.get('flash-attn') or 'absent'}"
        f"; attention backend {env.get('attention_backend', 'n/a')}. Commit "
        f"{report.get('commit', 'n/a')}; command `{report['command']}`; {report['wall_s']:.0f} s.",
        "",
        "| section | status | seconds | budget |",
        "|---|---|---|---|",
    ]
    for name, sec in secs.items():
        note = f" ({sec['failures'][0][:80]})" if sec.get("failures") else ""
        out.append(f"| {name} | {sec['status']}{note} | {_fmt(sec.get('seconds'), '.0f')} | "
                   f"{sec.get('budget_s', 'n/a')} |")  # fmt: skip
    if env.get("unmet_requirements"):
        out += ["", "Requirements the machine's packages do not meet (the check ran on them as they "
                "are): " + "; ".join(env["unmet_requirements"]) + "."]  # fmt: skip
    mm = env.get("matmul")
    if mm:
        out += ["", f"{mm['n']}^3 {mm['dtype']} matmul: {mm['tflops']} TFLOP/s."]
    tests = secs.get("tests", {}).get("result", {}).get("tests", [])
    if tests:
        out += ["", "| test | outcome | s |", "|---|---|---|"]
        for t in tests:
            why = f" ({t['message'][:60]})" if t["outcome"] != "passed" and t["message"] else ""
            out.append(f"| {t['test']} | {t['outcome']}{why} | {t['seconds']} |")
    tr = secs.get("train", {}).get("result", {}).get("train")
    if tr:
        out += ["", f"ts-train: backend {tr.get('backend')} (world {tr.get('world')}), DeepSpeed "
                f"accelerator {tr.get('ds_accelerator')}, {tr.get('precision')}, ZeRO-1; killed in "
                f"its last save (latest {tr.get('latest_after_kill')}), resumed from "
                f"{tr.get('resumed_from')}; losses {tr.get('losses_first')} then "
                f"{tr.get('losses_resumed')}: max difference {tr.get('max_abs_diff')}."]  # fmt: skip
    th = secs.get("throughput", {}).get("result", {})
    if th.get("throughput"):
        out += ["", "| s | px | layers | micro-batch | positions | step s | images/s | TFLOP/s | "
                "MFU | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in th["throughput"]:
            out.append(
                f"| {r['s']} | {r['resolution']} | {r['layers']} | {r['micro_batch']} | "
                f"{_fmt(r['positions'])} | {r['step_s']} | {r['images_per_s']} | {r['tflops']} | "
                f"{_fmt(r['mfu'], '.1%')} | {r['peak_memory_gib']} |"
            )
        big = th.get("largest_micro_batch")
        if big:
            out += ["", f"Largest {big['resolution']} px s = {big['s']} micro-batch that ran a "
                    f"step: {big['largest_micro_batch']} (first out of memory: "
                    f"{_fmt(big['first_out_of_memory'])}, cap {big['cap']})."]  # fmt: skip
        by_s = {r["s"]: r for r in th["throughput"]}
        if by_s.get(2, {}).get("profile"):
            out += _profile_table("One s = 2 training step", by_s[2]["profile"])
    sa = secs.get("sampling", {}).get("result", {}).get("sampling")
    if sa:
        out += ["", "| s | px | batch | steps | s / image | steps / s | measured |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in sa:
            how = "all" if not r["estimated"] else f"{r['measured_steps']} steps, rest estimated"
            out.append(f"| {r['s']} | {r['resolution']} | {r['batch']} | {r['steps']} | "
                       f"{r['s_per_image']} | {r['steps_per_s']} | {how} |")  # fmt: skip
    prof = secs.get("sampling", {}).get("result", {}).get("profile")
    if prof:
        s = secs["sampling"]["result"].get("profile_s")
        out += _profile_table(f"The prompt and 16 decoding steps at s = {s}", prof)
    tk = secs.get("tokenize", {}).get("result", {}).get("tokenize")
    if tk:
        out += ["", "| tokenizer | px | batch | images | images/s |", "|---|---|---|---|---|"]
        out += [f"| {r['vq']} | {r['px']} | {r['batch']} | {r['images']} | {r['images_per_s']} |"
                for r in tk]  # fmt: skip
    out += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in report.get("targets", []):
        met = {True: "yes", False: "no", None: "n/a"}[t["met"]]
        out.append(f"| {t['target']} | {t['goal']} | {_fmt(t['value'])} | {met} |")
    return "\n".join(out) + "\n"


def _commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=False)  # fmt: skip
    return proc.stdout.strip() or None


def drive(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="ts-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    scale = 5 if args.mode == "smoke" else 1
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = set(names) - set(SECTIONS)
    if unknown:
        print(f"gpu_check: unknown section(s) {', '.join(sorted(unknown))}; "
              f"choose from {', '.join(SECTIONS)}", file=sys.stderr)  # fmt: skip
        return 2
    budget = args.budget or scale * sum(SECTIONS[n] for n in names)
    start = time.time()
    end = start + budget
    report = {
        "schema": 1, "mode": args.mode,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["scripts/gpu_check.sh", *sys.argv[1:]]), "commit": _commit(),
        "budget_s": budget, "wall_s": 0.0, "sections": {}, "targets": [],
    }  # fmt: skip
    log = (out / "gpu_check.log").open("a")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TS_LOG_LEVEL": os.environ.get("TS_LOG_LEVEL", "INFO"),
    }
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.mode == "smoke":  # a CUDA build of torch on a CPU machine: DeepSpeed would pick cuda
        env.setdefault("DS_ACCELERATOR", "cpu")
    failed = False
    for name in names:
        own = scale * SECTIONS[name]
        left = end - time.time()
        entry: dict = {"budget_s": own}
        if left < 10:
            entry.update(status="skipped", failures=[f"no time left ({left:.0f} s)"])
            report["sections"][name] = entry
            failed = True
            continue
        limit = min(own, left)
        result = work / f"{name}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--section", name, "--mode", args.mode,
               "--work", str(work), "--result", str(result),
               "--deadline", str(time.time() + limit - 3)]  # fmt: skip
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        log.write(f"\n==== {name} (limit {limit:.0f} s) ====\n")
        log.flush()
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code, status = None, "timeout"
        entry["seconds"] = round(time.time() - t0, 1)
        data = json.loads(result.read_text()) if result.exists() else {}
        entry["failures"] = data.pop("failures", [])
        if status == "failed" and not entry["failures"]:
            entry["failures"] = [f"exit code {code}: see gpu_check.log"]
        if status == "timeout":
            entry["failures"].append(f"stopped at its {limit:.0f} s limit")
        entry.update(status=status, result=data)
        failed |= status != "ok"
        report["sections"][name] = entry
        report["wall_s"] = round(time.time() - start, 1)
        report["targets"] = targets(report)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (out / "gpu_check.md").write_text(render_markdown(report))
        print(f"gpu_check: {name}: {status} in {entry['seconds']:.0f} s"
              + (f" ({entry['failures'][0][:150]})" if entry["failures"] else ""), flush=True)  # fmt: skip
    report["wall_s"] = round(time.time() - start, 1)
    report["targets"] = targets(report)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(render_markdown(report))
    log.close()
    print(f"gpu_check: {report['wall_s']:.0f} s; report in {out}/gpu_check.json and .md")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (what CI runs)")
    p.add_argument("--out", default="gpu_check_out", help="where the reports go")
    p.add_argument("--work", default=None, help="scratch directory (default: a new temp dir)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all sections")
    p.add_argument("--only", default=None, help="comma-separated sections: " + ",".join(SECTIONS))
    p.add_argument("--layers", type=int, default=None, help="blocks of the 2.7B width (20)")
    p.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=list(SIZES), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.section:
        return run_section(args)
    args.mode = "smoke" if args.smoke else "gpu"
    if args.mode == "gpu":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible; on a CPU machine run the smoke check "
                  "(--smoke)", file=sys.stderr)  # fmt: skip
            return 2
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
