"""A torch-extension build lock left by a killed build no longer hangs every later start."""

from __future__ import annotations

import os
import time

from megatron_ts.distributed import init


def test_a_stale_build_lock_is_removed_with_a_warning_and_a_fresh_one_is_kept(
    tmp_path, monkeypatch, warnings_logged
):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = tmp_path / "deepspeed_shm_comm"
    build.mkdir()
    lock = build / "lock"
    lock.touch()
    init._clear_stale_build_lock()  # a build may be running right now: wait for it
    assert lock.exists() and warnings_logged == []
    old = time.time() - init.STALE_BUILD_LOCK_S - 60
    os.utime(lock, (old, old))
    init._clear_stale_build_lock()
    assert not lock.exists()
    assert len(warnings_logged) == 1 and str(lock) in warnings_logged[0]
    assert "killed" in warnings_logged[0]
    init._clear_stale_build_lock()  # nothing there: nothing to do


def test_the_extension_build_cache_is_per_environment(tmp_path, monkeypatch):
    """Two environments never rebuild each other's DeepSpeed op in a shared torch cache."""
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    monkeypatch.setattr(init.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(init.sys, "base_prefix", "/usr")
    assert init.environment_build_cache() == str(tmp_path / "torch_extensions")
    monkeypatch.setattr(init.sys, "base_prefix", str(tmp_path))  # the system Python: torch's own
    assert init.environment_build_cache() is None
    monkeypatch.setenv("CONDA_PREFIX", str(tmp_path))  # a conda environment is one too
    assert init.environment_build_cache() == str(tmp_path / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")  # the user's choice wins
    assert init.environment_build_cache() == "/elsewhere"
