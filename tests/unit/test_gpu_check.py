"""The GPU check kit: which wheels travel, and how a report becomes the benchmarks tables.

The check itself runs in CI as `scripts/gpu_check.sh --smoke` (.ci/run), on CPU at tiny sizes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_wheels  # noqa: E402

ENV312 = gpu_wheels.target_env("3.12")


def test_missing_packages_follows_needs_and_stops_at_the_machine():
    graph = {
        "app-a": ["app-d", "app-e; extra == 'docs'", "torch"],
        "app-b": [],
        "app-c": ["app-f"],
        "app-d": ["app-b>=1"],
        "app-f": [],
    }
    roots = [
        "App_A>=1",
        "app-g; python_version < '3.12'",
        "app-c",
        "app-h; sys_platform == 'win32'",
    ]
    got = gpu_wheels.missing_packages(roots, graph.get, {"torch", "app-c"}, ENV312)
    # app-c is on the machine: neither it nor its need app-f travels; extras and markers that
    # do not hold for Python 3.12 on Linux are not followed
    assert got == ["app-a", "app-b", "app-d"]


def test_missing_packages_needs_metadata_of_what_travels():
    with pytest.raises(LookupError, match="app-x"):
        gpu_wheels.missing_packages(["app-x"], {}.get, set(), ENV312)


def test_read_machine(tmp_path):
    path = tmp_path / "machine.txt"
    path.write_text("# header\ntorch==2.11.0\nTyping_Extensions\n\n  numpy==2.5.2  # comment\n")
    assert gpu_wheels.read_machine(path) == {
        "torch": "2.11.0",
        "typing-extensions": None,
        "numpy": "2.5.2",
    }


def test_machine_constraints_name_what_the_carried_packages_need_of_the_machine():
    graph = {
        "app-a": ["numpy>=2.6", "torch", "tqdm>=4; python_version < '3.10'", "app-b"],
        "app-b": ["packaging>=24.2"],
    }
    machine = {"numpy": "2.5.2", "torch": "2.11.0", "tqdm": None, "packaging": None}
    got = gpu_wheels.machine_constraints(["app-a", "app-b"], graph.get, machine, ENV312)
    # unversioned and marker-excluded requirements are no constraint
    assert got == [("app-a", "numpy", ">=2.6", "2.5.2"), ("app-b", "packaging", ">=24.2", None)]


def test_the_project_carries_what_the_gpu_machine_lacks():
    """With this environment's metadata: what megatron_ts needs and the H200 image does not have."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gpu_wheels.py"), "--list"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = {line.split("==")[0] for line in proc.stdout.split()}
    assert {"deepspeed", "megatron-core", "webdataset", "boto3", "hjson", "pydantic"} <= names
    assert not names & {"torch", "transformers", "numpy", "safetensors", "tensorboard", "pillow"}
    assert "typing-extensions" in names  # --carry's default
    assert "unverified: megatron-core needs packaging>=24.2" in proc.stderr


def _report(mode: str) -> dict:
    row = {"layers": 20, "resolution": 1024, "positions": 1154, "step_s": 1.0,
           "tflops": 450.0, "peak_memory_gib": 80.0, "micro_batch": 8}  # fmt: skip
    return {
        "mode": mode, "started": "2026-12-01T00:00:00+00:00", "command": "scripts/gpu_check.sh",
        "commit": "abc1234", "wall_s": 400.0,
        "sections": {
            "env": {"status": "ok", "seconds": 20, "budget_s": 25, "failures": [],
                    "result": {"machine": {"device": "NVIDIA H200", "python": "3.12.3"}}},
            "throughput": {"status": "ok", "seconds": 170, "budget_s": 180, "failures": [],
                           "result": {"speedup_s2_over_s1": 3.6, "throughput": [
                               {**row, "s": 2, "images_per_s": 8.0, "mfu": 0.46,
                                "profile": {"wall_ms": 1000.0, "busy_ms": 950.5,
                                            "clock": "device", "top": [
                                    {"name": "sm90_xmma_gemm|bf16", "calls": 420, "ms": 610.2,
                                     "share": 0.642}]}},
                               {**row, "s": 1, "images_per_s": 2.2, "mfu": 0.41}]}},
            "sampling": {"status": "timeout", "seconds": 75, "budget_s": 75,
                         "failures": ["stopped at its 75 s limit"],
                         "result": {"sampling": [
                             {"s": 2, "resolution": 1024, "batch": 1, "steps": 1024,
                              "s_per_image": 9.0, "steps_per_s": 113.8, "estimated": False},
                             {"s": 1, "resolution": 1024, "batch": 1, "steps": 4096,
                              "s_per_image": 30.0, "steps_per_s": 136.5, "estimated": True,
                              "measured_steps": 900}]}},
        },
    }  # fmt: skip


def test_targets_in_gpu_mode():
    report = _report("gpu")
    report["sections"]["sampling"]["result"]["speedup_s2_over_s1"] = 3.33
    got = {t["target"].split(",")[0]: (t["value"], t["met"]) for t in gpu_check.targets(report)}
    assert got == {
        "MFU": (0.46, True),
        "training images/s": (3.6, True),
        "sampling s/image": (3.33, False),
    }


def test_targets_are_not_judged_in_smoke_mode_or_when_unmeasured():
    report = _report("smoke")
    assert [t["met"] for t in gpu_check.targets(report)] == [None, None, None]
    report = _report("gpu")
    del report["sections"]["throughput"]
    assert [t["met"] for t in gpu_check.targets(report)] == [None, None, None]


def test_markdown_has_every_measured_row():
    report = _report("gpu")
    report["targets"] = gpu_check.targets(report)
    md = gpu_check.render_markdown(report)
    assert md.startswith("### GPU check, 2026-12-01 (gpu)")
    assert "| sampling | timeout (stopped at its 75 s limit) | 75 | 75 |" in md
    assert "| 2 | 1024 | 20 | 8 | 1154 | 1.0 | 8.0 | 450.0 | 46.0% | 80.0 |" in md
    assert "| 1 | 1024 | 1 | 4096 | 30.0 | 136.5 | 900 steps, rest estimated |" in md
    assert "| MFU, 2.7B width, 1024 px, s = 2 | 0.45 | 0.46 | yes |" in md
    assert "One s = 2 training step: device busy 950.5 ms of 1000.0 ms wall" in md
    assert "| `sm90_xmma_gemm/bf16` | 420 | 610.2 | 64.2% |" in md


def test_gpu_mode_refuses_a_machine_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "gpu_check: no CUDA device visible; on a CPU machine run the smoke check (--smoke)"
    )
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_decode_stopped_at_its_budget_reports_an_estimate():
    import torch

    bench = gpu_check._bench("bench_sampling")
    torch.set_num_threads(1)
    model = bench.build("debug", 1, 256, 256, 512, "cpu", torch.float32)  # 16 x 16 = 256 steps
    full = gpu_check.timed_decode(bench, model, 256, 1, "cpu", budget=600)
    assert (full["estimated"], full["measured_steps"], full["steps"]) == (False, 256, 256)
    cut = gpu_check.timed_decode(bench, model, 256, 1, "cpu", budget=0.0)  # stops at step 2
    assert (cut["estimated"], cut["measured_steps"], cut["steps"]) == (True, 2, 256)
    assert cut["s_per_image"] > 0


def _clock(durations: list[float]):
    clock = gpu_check._StepClock()
    clock.times = [0.0]
    for d in durations:
        clock.times.append(clock.times[-1] + d)
    return clock


def test_step_extrapolation():
    # constant steps: 255 intervals of 10 ms
    assert _clock([0.01] * 20).extrapolate(256) == pytest.approx(2.55)
    # steps that grow with the cache (10 ms + 0.1 ms per step): the exact sum over 255 steps
    growing = [0.01 + 1e-4 * k for k in range(1, 41)]
    exact = sum(0.01 + 1e-4 * k for k in range(1, 256))
    assert _clock(growing).extrapolate(256) == pytest.approx(exact, rel=1e-9)
    # falling step times are warm-up or noise, not a trend: the measured mean is carried on
    falling = [0.02 - 1e-4 * k for k in range(1, 41)]
    assert _clock(falling).extrapolate(256) == pytest.approx(255 * sum(falling) / 40)
    # too few steps for a trend
    assert _clock([0.01, 0.03]).extrapolate(11) == pytest.approx(0.2)


def test_largest_micro_batch_doubles_then_bisects(tmp_path):
    """The search's arithmetic, against an engine whose steps run out of memory above 5."""
    import time

    import torch

    class FiveFit:
        def __init__(self):
            self.tried = []

        def train_step(self, batches):
            b = next(batches)["codes"].shape[0]
            self.tried.append(b)
            if b > 5:
                raise torch.OutOfMemoryError("out of memory (test)")

    sec = gpu_check.Section(tmp_path / "r.json", "smoke", tmp_path, time.time() + 60, None)
    sec.size["big_max"] = 64
    engine = FiveFit()
    got = gpu_check._largest_micro_batch(sec, engine, 2, 64)
    assert (got["largest_micro_batch"], got["first_out_of_memory"], got["stopped"]) == (5, 6, None)
    assert engine.tried == [1, 2, 4, 8, 6, 5]
