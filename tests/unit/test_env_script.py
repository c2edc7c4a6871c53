"""scripts/env.sh: which Python environment the README's commands install into and run from."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHOW = 'source scripts/env.sh && printf "%s\\n" "$PYTHON" "${PATH%%:*}" "${TORCH_EXTENSIONS_DIR:-}"'


def source_env(**env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "TS_VENV")}
    base.pop("TORCH_EXTENSIONS_DIR", None)
    return subprocess.run(
        ["bash", "-c", SHOW], cwd=ROOT, env={**base, **env}, capture_output=True, text=True
    )


def test_creates_the_project_venv_when_none_is_active(tmp_path):
    venv = tmp_path / "venv"
    proc = source_env(TS_VENV=str(venv), TS_BASE_PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stderr
    created, python, first_on_path, extensions = proc.stdout.splitlines()
    assert created.startswith(f"creating the virtual environment {venv} (Python 3.")
    assert python == f"{venv}/bin/python" and Path(python).is_file()
    assert first_on_path == f"{venv}/bin"  # ts-train etc. resolve to this environment
    assert extensions == f"{venv}/torch_extensions"  # not a cache another environment built
    # a second call reuses it
    again = source_env(TS_VENV=str(venv), TS_BASE_PYTHON=sys.executable)
    assert "creating the virtual environment" not in again.stdout


def test_python_wins_and_puts_its_scripts_dir_first():
    proc = source_env(PYTHON=sys.executable, VIRTUAL_ENV="/nonexistent")
    assert proc.returncode == 0, proc.stderr
    python, first_on_path, _ = proc.stdout.splitlines()
    assert python == sys.executable
    assert first_on_path == sysconfig.get_path("scripts")


def test_an_active_virtualenv_is_used(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    proc = source_env(VIRTUAL_ENV=str(venv))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == [f"{venv}/bin/python", f"{venv}/bin"]


def test_bad_environments_are_one_line_and_exit_2():
    proc = source_env(VIRTUAL_ENV="/nonexistent")
    assert (proc.returncode, proc.stderr.strip()) == (
        2,
        "VIRTUAL_ENV=/nonexistent holds no bin/python",
    )
    proc = source_env(PYTHON="no-such-python")
    assert (proc.returncode, proc.stderr.strip()) == (
        2,
        "PYTHON=no-such-python: no such interpreter",
    )
