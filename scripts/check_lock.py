"""Checks the running environment against the lock files: one line per difference, exit 1 if any.

    python scripts/check_lock.py requirements/lock.txt [requirements/lock-dev.txt] [--strict]
        [--ignore NAME]

Every `name==version` pin must be installed at that version (a local label such as `+cpu` on the
installed version is allowed when the pin has none: `torch==2.13.0` is met by the CPU and the CUDA
builds alike). With `--strict` nothing may be installed that no lock names, apart from pip and
megatron_ts itself: that is how CI proves an install step is not missing. Standard library only,
so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

# installed by venv itself or the project under test, never pinned in the lock
NOT_LOCKED = {"pip", "megatron-ts"}


def normalize(name: str) -> str:
    """PEP 503 name: `Jinja2` and `typing_extensions` become `jinja2` and `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """`name==version` pins of one lock file (comments, blank lines and `-r` includes skipped)."""
    pins = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            sys.exit(
                f"{path}:{n}: expected name==version, got {raw.strip()!r} (regenerate the "
                "lock with scripts/lock.sh)"
            )
        pins[normalize(name.strip())] = version.strip()
    return pins


def installed() -> dict[str, str]:
    """Normalized name -> version of every distribution on sys.path (first one wins, as import)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def matches(pin: str, version: str) -> bool:
    return version == pin or ("+" not in pin and version.split("+", 1)[0] == pin)


def problems(
    pins: dict[str, str], have: dict[str, str], strict: bool, ignore: set[str] = frozenset()
) -> list[str]:
    out = []
    for name, pin in sorted(pins.items()):
        if name in ignore:
            continue
        if name not in have:
            out.append(f"{name}=={pin} is locked but not installed")
        elif not matches(pin, have[name]):
            out.append(f"{name} {have[name]} is installed, the lock says {pin}")
    if strict:
        for name in sorted(set(have) - set(pins) - NOT_LOCKED):
            out.append(f"{name} {have[name]} is installed but in no lock file (a missing pin)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("locks", nargs="+", type=Path, help="lock files (requirements/*.txt)")
    parser.add_argument("--strict", action="store_true", help="also refuse unlocked packages")
    parser.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="NAME",
        help="a locked package whose version may differ (install.sh: a torch you installed)",
    )
    args = parser.parse_args()
    pins: dict[str, str] = {}
    for path in args.locks:
        if not path.is_file():
            sys.exit(f"no lock file {path} (regenerate it with scripts/lock.sh)")
        pins.update(read_lock(path))
    found = problems(pins, installed(), args.strict, {normalize(n) for n in args.ignore})
    for line in found:
        print(f"check_lock: {line}", file=sys.stderr)
    if found:
        print(
            f"check_lock: {len(found)} difference(s) from {', '.join(map(str, args.locks))}; "
            "reinstall with scripts/install.sh in a fresh environment",
            file=sys.stderr,
        )
        sys.exit(1)
    print(
        f"check_lock: {len(pins)} locked packages installed at their locked versions"
        + (", nothing else" if args.strict else "")
    )


if __name__ == "__main__":
    main()
