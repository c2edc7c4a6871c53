"""RNG state without pickle, and `checkpoint.load` as docs/checkpoint.md describes it: weights
only, from a run directory, a step directory or an HF export, never unpickling anything."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ts_train import ENV, ROOT, losses, run_train

STEP_2, STEP_4 = "step_00000002", "step_00000004"


def _train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_train(run_dir, "--checkpoint.interval_steps", "2", *overrides)


class _Payload:
    """Unpickling this creates `marker`: what a hostile pickle could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _poison(path: Path, marker: Path) -> None:
    torch.save(_Payload(marker), path)  # the zip-and-pickle format torch.load reads


def _rehash(ckpt: Path) -> None:
    """checksums.json over the files as they are now (an attacker can write it too)."""
    from megatron_ts.checkpoint.integrity import file_digest, list_files, write_checksums

    write_checksums(ckpt, {rel: file_digest(ckpt / rel) for rel in list_files(ckpt)})


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A finished 4-step debug run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    proc = _train(run_dir, "--train.steps", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def export(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_ts.convert.cli", "to-hf", str(source), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# the pickles a version-1 checkpoint held (DeepSpeed's engine files, the RNG state)
_V1_PICKLES = (
    "deepspeed/ds/mp_rank_00_model_states.pt",
    "deepspeed/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "rng/rank_00000.pt",
)


@pytest.fixture(scope="module")
def poisoned(source, tmp_path_factory) -> tuple[Path, Path]:
    """The source run with step 4 made a version-1 checkpoint whose pickles (DeepSpeed's files,
    the RNG file) all hold a payload, checksums.json rewritten to match: (run dir, marker)."""
    base = tmp_path_factory.mktemp("poisoned")
    run_dir, marker = base / "run", base / "PWNED"
    shutil.copytree(source, run_dir)
    ckpt = run_dir / "checkpoints" / STEP_4
    for rng in (ckpt / "rng").iterdir():
        rng.unlink()
    shutil.rmtree(ckpt / "optimizer")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["format"] = "megatron_ts.ckpt/1"
    del meta["optimizer"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    for rel in _V1_PICKLES:
        (ckpt / rel).parent.mkdir(parents=True, exist_ok=True)
        _poison(ckpt / rel, marker)
    _rehash(ckpt)
    return run_dir, marker


def test_a_version_1_checkpoint_resumes_its_weights_without_unpickling(poisoned, tmp_path):
    """Its optimizer state lives in DeepSpeed's pickles: the resume loads the weights, says the
    optimizer starts fresh, and never runs the payloads."""
    poisoned_run, marker = poisoned
    run_dir = tmp_path / "run"
    shutil.copytree(poisoned_run, run_dir)
    (run_dir / "metrics.jsonl").unlink()
    proc = _train(run_dir, "--train.steps", "5")
    assert not marker.exists(), "a pickle of the version-1 checkpoint was executed"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not unpickled" in proc.stderr and "(weights)" in proc.stderr, proc.stderr[-3000:]
    assert sorted(losses(run_dir)) == [5]


def test_a_pickle_in_place_of_any_checkpoint_file_never_runs(source, tmp_path):
    """Every tensor file of the checkpoint (weights, optimizer, RNG) replaced by a pickle with a
    payload, checksums.json rewritten to match: the resume stops naming a file (exit 5)."""
    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(source, run_dir)
    ckpt = run_dir / "checkpoints" / STEP_4
    planted = sorted(ckpt.rglob("*.safetensors"))
    assert {p.parent.name for p in planted} >= {"model", "master", "exp_avg", "exp_avg_sq", "rng"}
    for path in planted:
        _poison(path, marker)
    _rehash(ckpt)
    proc = _train(run_dir, "--train.steps", "5")
    assert not marker.exists(), "a planted pickle was executed"
    assert proc.returncode == 5, proc.stderr[-3000:]  # megatron_ts.errors.EXIT_CHECKPOINT
    line = _one_line(proc.stderr)
    assert STEP_4 in line and ".safetensors" in line, line


def test_rng_state_round_trips_bit_exactly_through_safetensors(tmp_path):
    from megatron_ts.training.checkpoint import _read_rng, _rng_state, _set_rng_state, _write_rng

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.gauss(0.0, 1.0)  # leaves gauss_next set
    np.random.standard_normal()  # leaves numpy's cached gaussian set
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1
    path = tmp_path / "rank_00000.safetensors"
    _write_rng(path, _rng_state())

    def draw():
        return (
            random.random(),
            random.gauss(0.0, 1.0),
            np.random.standard_normal(3).tolist(),
            np.random.randint(0, 2**31, 4).tolist(),
            torch.rand(5).tolist(),
        )

    first = draw()
    _set_rng_state(_read_rng(path))
    assert draw() == first
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) >= {"torch", "python_mt", "numpy_key"}
        assert f.metadata()["format"] == "megatron_ts.rng/1"
    assert path.read_bytes()[:2] != b"\x80\x04"  # not a pickle stream


def test_checkpoints_hold_safetensors_rng_and_resume_exactly(source, tmp_path):
    ckpt = source / "checkpoints" / STEP_2
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_00000.safetensors"]
    assert (
        "rng/rank_00000.safetensors" in json.loads((ckpt / "checksums.json").read_text())["files"]
    )
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / STEP_4)
    (run_dir / "checkpoints/latest").write_text(STEP_2 + "\n")
    proc = _train(run_dir, "--train.steps", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(exact)" in proc.stderr and "not bit-exact" not in proc.stderr
    ref, got = losses(source), losses(run_dir)
    assert [got[s] for s in (3, 4)] == [ref[s] for s in (3, 4)]  # bit for bit


def test_a_pickle_as_rng_file_is_never_executed(source, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(source, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / STEP_4)
    (run_dir / "checkpoints/latest").write_text(STEP_2 + "\n")
    ckpt = run_dir / "checkpoints" / STEP_2
    for rng in (ckpt / "rng").iterdir():
        rng.unlink()
    _poison(ckpt / "rng/rank_00000.pt", marker)  # as an older version (or an attacker) left it
    _rehash(ckpt)
    proc = _train(run_dir, "--train.steps", "4")
    assert not marker.exists(), "the pickle in rng/rank_00000.pt was executed"
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = [line for line in proc.stderr.splitlines() if "rank_00000.pt" in line]
    assert warning and "not bit-exact" in warning[0], proc.stderr[-3000:]
    assert losses(run_dir)[4] == losses(source)[4]  # training itself draws no random numbers


def test_checkpoint_load_reads_the_same_weights_from_run_step_and_hf_dirs(
    source, export, poisoned, tmp_path
):
    poisoned_run, marker = poisoned
    sources = {
        "run": poisoned_run,
        "step": poisoned_run / "checkpoints" / STEP_4,
        "hf": export,
    }
    first = {}
    for name, path in sources.items():
        run_dir = tmp_path / name
        proc = _train(run_dir, "--train.steps", "2", "--checkpoint.load", str(path))
        assert not marker.exists(), f"checkpoint.load of the {name} dir executed a pickle"
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        assert "(weights)" in proc.stderr, proc.stderr[-3000:]
        assert "rank_00000.pt" not in proc.stderr  # the RNG state is not even looked at
        assert not (run_dir / ".checkpoint-load-hf").exists()
        first[name] = losses(run_dir)
    fresh = tmp_path / "fresh"
    assert _train(fresh, "--train.steps", "1").returncode == 0
    assert first["run"][1] == first["step"][1] == first["hf"][1]
    assert first["run"][1] != losses(fresh)[1]  # the weights were loaded
    # a fresh optimizer, the same for all three: the second losses agree too
    assert first["run"][2] == first["step"][2] == first["hf"][2]


def test_checkpoint_load_optimizer_is_an_explicit_opt_in(source, tmp_path):
    step = source / "checkpoints" / STEP_4
    plain, with_opt = tmp_path / "plain", tmp_path / "opt"
    assert _train(plain, "--train.steps", "2", "--checkpoint.load", str(step)).returncode == 0
    proc = _train(
        with_opt,
        "--train.steps",
        "2",
        "--checkpoint.load",
        str(step),
        "--checkpoint.load_optimizer",
        "true",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(exact)" in proc.stderr
    a, b = losses(plain), losses(with_opt)
    assert a[1] == b[1]  # the same weights
    assert a[2] != b[2]  # the Adam moments of the source run change the first update


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("ts-train:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


def test_checkpoint_load_of_another_model_names_the_field(source, export, tmp_path):
    proc = _train(tmp_path / "a", "--checkpoint.load", str(export), "--model.num_layers", "4")
    assert proc.returncode == 5, proc.stderr[-3000:]  # megatron_ts.errors.EXIT_CHECKPOINT
    line = _one_line(proc.stderr)
    assert "model.num_layers" in line and str(export) in line
    # the same check for a training checkpoint, and for a field other than the shape
    proc = _train(tmp_path / "b", "--checkpoint.load", str(source), "--model.rope_theta", "500")
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert "model.rope_theta" in _one_line(proc.stderr)
    # an export whose own spec differs (edited, or of another flavor)
    other = tmp_path / "other"
    shutil.copytree(export, other)
    config = json.loads((other / "config.json").read_text())
    config["model_spec"]["shape"]["hidden_size"] = 128
    (other / "config.json").write_text(json.dumps(config))
    proc = _train(tmp_path / "c", "--checkpoint.load", str(other))
    assert proc.returncode == 5, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert "model.hidden_size" in line and "128" in line
