"""Downloads the wheels the GPU check machine lacks, for it to carry (docs/gpu.md, step 1).

    python scripts/gpu_wheels.py [--out .gpu-wheels] [--machine scripts/gpu_machine.txt]
        [--python-version 3.12] [--limit-mib 64] [--list]

Which packages: megatron_ts's requirements, followed through their own requirements (markers
evaluated for the target Python on Linux x86-64), stopping at every package the machine already
has (scripts/gpu_machine.txt): what is left is exactly what must travel, plus any machine package
whose listed version a travelling package does not accept, and `--carry` (typing-extensions by
default); requirements on machine packages of unknown version are printed as unverified. Each
goes at its requirements/lock.txt version as a Python 3.12 manylinux x86-64 wheel from the
package index; a
package published only as a source distribution (DeepSpeed) is built into a pure-Python wheel
here (DS_BUILD_OPS=0: its CUDA ops are JIT-compiled on the GPU when used, and the check uses
none). The folder is emptied first, gets a manifest.json (name, version, file, sha256, bytes),
and the wheels plus the files that travel with the checkout must stay under the device tool's
limit (64 MiB): over it, the script exits 1 naming the largest wheels.

Run it with the project's environment (it reads the installed metadata and the lock): the
README's test command creates one, then `.venv/bin/python scripts/gpu_wheels.py`. Exit codes:
0 done, 1 over the size limit or a package cannot be fetched, 2 usage or environment errors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from check_lock import normalize, read_lock  # noqa: E402

PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
"""Platform tags the target accepts (its glibc is 2.28 or newer); pip matches each exactly."""


def read_machine(path: Path) -> dict[str, str | None]:
    """Normalized name -> version (None where the file gives none) of the machine's packages,
    from `name` or `name==version` lines."""
    found: dict[str, str | None] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[normalize(name.strip())] = version.strip() or None
    return found


def target_env(python_version: str) -> dict[str, str]:
    """PEP 508 marker values of the target interpreter (CPython on Linux x86-64)."""
    return {
        "python_version": python_version,
        "python_full_version": python_version + ".0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "extra": "",
    }


def missing_packages(
    roots: list[str], requires, machine: set[str], env: dict[str, str]
) -> list[str]:
    """Normalized names to carry: `roots` and what they need, minus what the machine has.

    Args:
        roots: requirement strings of the project (PEP 508).
        requires: name -> list of that distribution's requirement strings (or None if unknown).
        machine: normalized names already on the machine; they and their needs are not followed.
        env: marker environment of the target.

    Raises:
        LookupError: a package to carry whose requirements are unknown (not installed here).
    """
    from packaging.requirements import Requirement

    def needed(spec: str) -> str | None:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate(env):
            return None
        return normalize(req.name)

    todo = [n for n in map(needed, roots) if n]
    carry: list[str] = []
    while todo:
        name = todo.pop(0)
        if name in machine or name in carry:
            continue
        deps = requires(name)
        if deps is None:
            raise LookupError(name)
        carry.append(name)
        todo.extend(n for n in map(needed, deps) if n)
    return sorted(carry)


def machine_constraints(
    carried: list[str], requires, machine: dict[str, str | None], env: dict[str, str]
) -> list[tuple[str, str, str, str | None]]:
    """(carried package, machine package, version specifier, the machine's version or None) for
    each versioned requirement of a carried package on a package the machine has."""
    from packaging.requirements import Requirement

    found = []
    for name in carried:
        for spec in requires(name) or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = normalize(req.name)
            if dep in machine and str(req.specifier):
                found.append((name, dep, str(req.specifier), machine[dep]))
    return found


def _installed_requires(name: str) -> list[str] | None:
    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return None


def _pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "-q", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("WARNING: Location")]
        raise RuntimeError(f"{' '.join(cmd[3:])} failed:\n" + "\n".join(lines[-15:]))


def fetch(name: str, version: str, out: Path, python_version: str, work: Path) -> Path:
    """One wheel of name==version for the target in `out`; returns its path."""
    before = set(out.glob("*.whl"))
    spec = f"{name}=={version}"
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    try:
        _pip("download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
             "--python-version", python_version, *platforms, "-d", str(out), spec)  # fmt: skip
    except RuntimeError as binary_error:
        # Only a source distribution (DeepSpeed): build a wheel here; it must come out pure.
        sdists = work / name
        try:
            _pip("download", "--no-deps", "--no-binary=:all:", "-d", str(sdists), spec)
        except RuntimeError:
            raise binary_error from None
        (sdist,) = sdists.iterdir()
        env = {**os.environ, "DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cpu"}
        _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(sdist), env=env)
    (wheel,) = set(out.glob("*.whl")) - before
    if (
        not wheel.name.endswith("-none-any.whl")
        and f"cp{python_version.replace('.', '')}" not in wheel.name
    ):
        raise RuntimeError(
            f"{wheel.name} was built for this machine's Python, not {python_version}"
        )
    return wheel


def tree_bytes() -> int:
    """Bytes of what the device tool sends: tracked and untracked, not ignored, files."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    return sum(
        (ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file()
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / ".gpu-wheels")
    p.add_argument("--machine", type=Path, default=ROOT / "scripts/gpu_machine.txt")
    p.add_argument("--lock", type=Path, default=ROOT / "requirements/lock.txt")
    p.add_argument("--python-version", default="3.12")
    p.add_argument("--limit-mib", type=float, default=64.0)
    p.add_argument("--list", action="store_true", help="print what would be carried and stop")
    p.add_argument(
        "--carry",
        nargs="*",
        default=["typing-extensions"],
        help="machine packages to carry anyway, at their lock version (default: "
        "typing-extensions, which pydantic needs at >= 4.16 and whose version on the machine "
        "is not known; it is backward compatible and 45 KiB)",
    )
    args = p.parse_args(argv)
    try:
        roots = metadata.requires("megatron_ts") or []
    except metadata.PackageNotFoundError:
        print("gpu_wheels: megatron_ts is not installed in this Python: run it with the "
              "project's environment (.venv/bin/python, after scripts/install.sh)", file=sys.stderr)  # fmt: skip
        return 2
    pins = read_lock(args.lock)
    machine, env = read_machine(args.machine), target_env(args.python_version)
    try:
        names = missing_packages(roots, _installed_requires, machine, env)
    except LookupError as err:
        print(f"gpu_wheels: {err} is needed but not installed here: run scripts/install.sh",
              file=sys.stderr)  # fmt: skip
        return 2
    # What travels must also work with the machine's own packages it imports.
    also = {normalize(n) for n in args.carry}
    for who, dep, spec, have in machine_constraints(names, _installed_requires, machine, env):
        if dep in also:
            continue
        if have is None:
            print(f"unverified: {who} needs {dep}{spec}; {args.machine.name} gives no version "
                  f"(`pip show {dep}` on the machine)", file=sys.stderr)  # fmt: skip
        elif not SpecifierSet(spec).contains(have, prereleases=True):
            print(f"{dep} {have} on the machine does not meet {who}'s {spec}: carried at its "
                  "lock version", file=sys.stderr)  # fmt: skip
            also.add(dep)
    names = sorted(set(names) | also)
    unpinned = [n for n in names if n not in pins]
    if unpinned:
        print(f"gpu_wheels: not in {args.lock}: {', '.join(unpinned)}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(f"{n}=={pins[n]}" for n in names))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for old in [*args.out.glob("*.whl"), args.out / "manifest.json"]:
        old.unlink(missing_ok=True)
    work = args.out / ".sdist"
    entries = []
    try:
        for name in names:
            wheel = fetch(name, pins[name], args.out, args.python_version, work)
            data = wheel.read_bytes()
            entries.append({
                "name": name, "version": pins[name], "file": wheel.name,
                "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            })  # fmt: skip
            print(f"{wheel.name}  {len(data) / 2**20:.2f} MiB", flush=True)
    except RuntimeError as err:
        print(f"gpu_wheels: {err}", file=sys.stderr)
        return 1
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    manifest = {"python_version": args.python_version, "machine": args.machine.name,
                "wheels": entries}  # fmt: skip
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    wheels = sum(e["bytes"] for e in entries)
    inside = args.out.resolve().is_relative_to(ROOT)
    tree = tree_bytes()
    total = wheels + tree if inside else wheels
    print(f"{len(entries)} wheels, {wheels / 2**20:.1f} MiB; with the checkout's "
          f"{tree / 2**20:.1f} MiB: {total / 2**20:.1f} MiB of {args.limit_mib:g} MiB")  # fmt: skip
    if total > args.limit_mib * 2**20:
        big = sorted(entries, key=lambda e: -e["bytes"])[:3]
        print("gpu_wheels: over the device tool's limit; largest: "
              + ", ".join(f"{e['file']} ({e['bytes'] / 2**20:.1f} MiB)" for e in big), file=sys.stderr)  # fmt: skip
        return 1
    rel = args.out.resolve().relative_to(ROOT) if inside else args.out
    print(f"carry: {rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
