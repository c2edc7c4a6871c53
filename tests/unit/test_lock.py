"""The dependency lock: its checker, and that it agrees with setup.py's ranges."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import check_lock  # noqa: E402

LOCK, LOCK_DEV = ROOT / "requirements" / "lock.txt", ROOT / "requirements" / "lock-dev.txt"


def setup_requirements() -> tuple[list[Requirement], list[Requirement]]:
    """INSTALL_REQUIRES and the dev extra, read from setup.py without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    values = {
        t.id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name) and t.id in ("INSTALL_REQUIRES", "EXTRAS")
    }
    runtime = [Requirement(r) for r in values["INSTALL_REQUIRES"]]
    return runtime, [Requirement(r) for r in values["EXTRAS"]["dev"]]


def test_read_lock_normalizes_names_and_skips_comments(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\n-r other.txt\n\nJinja2==3.1.6\ntyping_extensions==4.16.0  # x\n")
    assert check_lock.read_lock(lock) == {"jinja2": "3.1.6", "typing-extensions": "4.16.0"}


def test_read_lock_refuses_a_range(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy>=2\n")
    with pytest.raises(SystemExit, match=r"lock.txt:1: expected name==version"):
        check_lock.read_lock(lock)


def test_problems_names_each_difference():
    pins = {"torch": "2.13.0", "numpy": "2.4.6", "pillow": "13.0.0"}
    have = {"torch": "2.13.0+cpu", "numpy": "2.4.5", "rich": "15.0.0", "pip": "23.2.1"}
    assert check_lock.problems(pins, have, strict=False) == [
        "numpy 2.4.5 is installed, the lock says 2.4.6",
        "pillow==13.0.0 is locked but not installed",
    ]
    strict = check_lock.problems(pins, have, strict=True)
    assert strict[-1] == "rich 15.0.0 is installed but in no lock file (a missing pin)"
    assert len(strict) == 3  # pip is never pinned
    # a torch the user installed is kept when install.sh says so
    assert check_lock.problems({"torch": "2.13.0"}, {"torch": "2.11.0"}, False, {"torch"}) == []


def test_a_pinned_local_label_must_match_exactly():
    assert check_lock.matches("2.13.0", "2.13.0+cu130")
    assert not check_lock.matches("2.13.0+cpu", "2.13.0+cu130")
    assert not check_lock.matches("2.13.0", "2.13.1")


def test_every_setup_requirement_is_locked_inside_its_range():
    pins = check_lock.read_lock(LOCK)
    dev_pins = {**pins, **check_lock.read_lock(LOCK_DEV)}
    runtime, dev = setup_requirements()
    for req, locked in [(r, pins) for r in runtime] + [(r, dev_pins) for r in dev]:
        name = check_lock.normalize(req.name)
        assert name in locked, f"{req} is not in the lock: run scripts/lock.sh"
        assert req.specifier.contains(locked[name]), f"lock {name}=={locked[name]} outside {req}"
    # the dev lock adds packages, it does not re-pin runtime ones
    assert not set(check_lock.read_lock(LOCK_DEV)) & set(pins)


def test_fast_moving_dependencies_have_upper_bounds():
    runtime, _ = setup_requirements()
    bounded = {
        check_lock.normalize(r.name) for r in runtime if any(s.operator == "<" for s in r.specifier)
    }
    fast = {
        "torch",
        "transformers",
        "deepspeed",
        "megatron-core",
        "webdataset",
        "tokenizers",
        "numpy",
    }
    assert fast <= bounded


@pytest.mark.skipif(
    os.environ.get("TS_LOCK") == "none", reason="TS_LOCK=none: installed from setup.py's ranges"
)
def test_this_environment_matches_the_lock():
    """The suite runs in an environment installed from the lock (scripts/test.sh); say if not."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_lock.py"), str(LOCK), str(LOCK_DEV)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "locked packages installed at their locked versions" in proc.stdout
