#!/usr/bin/env bash
# Installs megatron_ts and the tested versions of all its dependencies (docs/install.md).
#   scripts/install.sh          library + CLIs             (requirements/lock.txt)
#   scripts/install.sh dev      + test tools, moto S3 server (requirements/lock-dev.txt too)
#
# The environment is chosen by scripts/env.sh: $PYTHON, else the active virtualenv, else .venv in
# the checkout (created when missing). Knobs:
#   TS_LOCK=none         resolve setup.py's version ranges instead of the lock (your own stack)
#   TS_LOCK_STRICT=1     fail if the environment holds any package no lock names (CI sets it)
#   TS_TORCH_INDEX=URL   where to take torch from when it is missing (e.g. PyTorch's CPU or a
#                        CUDA wheel index); default: the configured index, see docs/install.md
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh
extra=${1:-}
case "$extra" in
    ""|dev) ;;
    *) echo "usage: scripts/install.sh [dev]" >&2; exit 2 ;;
esac
pip=("$PYTHON" -m pip)
locks=(requirements/lock.txt)
[ "$extra" = dev ] && locks+=(requirements/lock-dev.txt)
echo "installing megatron_ts${extra:+ [$extra]} into $("$PYTHON" -c 'import sys; print(sys.prefix)')"

torch_index=()
[ -n "${TS_TORCH_INDEX:-}" ] && torch_index=(--index-url "$TS_TORCH_INDEX")

if [ "${TS_LOCK:-}" = none ]; then
    # setup.py's ranges. Without torch, pip would resolve its range to a multi-GB CUDA build on a
    # machine without a GPU, so the tested CPU release goes first there.
    if ! "$PYTHON" -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1; then
            "${pip[@]}" install "${torch_index[@]}" "torch>=2.5,<2.14"
        else
            "${pip[@]}" install "${torch_index[@]}" "torch==2.13.0"
        fi
    fi
    "${pip[@]}" install -e ".${extra:+[$extra]}"
    "${pip[@]}" check
else
    torch_pin=$(grep -E '^torch==' requirements/lock.txt)
    keep=()
    if ! "$PYTHON" -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1; then
            # a CUDA build of the locked release, with the CUDA libraries it requires
            "${pip[@]}" install "${torch_index[@]}" "$torch_pin"
        else
            # the CPU build: its own requirements are pinned in the lock
            "${pip[@]}" install --no-deps "${torch_index[@]}" "$torch_pin"
        fi
    else
        have=$("$PYTHON" -c "import torch; print(torch.__version__)")
        if [ "${have%%+*}" != "${torch_pin#torch==}" ]; then
            echo "keeping the installed torch $have (the lock was tested with ${torch_pin#torch==})"
            keep=(--ignore torch)
        fi
    fi
    # setuptools first: the packages that ship as source (deepspeed, megatron_ts itself) are
    # built with the locked setuptools instead of whatever release pip would fetch for a build.
    "${pip[@]}" install --no-deps "$(grep -E '^setuptools==' requirements/lock.txt)"
    # Exactly the locked set: --no-deps, so a package missing from the lock fails `pip check`
    # below instead of being resolved to whatever release is newest today.
    grep -hvE '^(torch|setuptools)==' "${locks[@]}" | grep -vE '^(-r|#|$)' > "${TMPDIR:-/tmp}/ts-lock.$$"
    trap 'rm -f "${TMPDIR:-/tmp}/ts-lock.$$"' EXIT
    "${pip[@]}" install --no-deps --no-build-isolation -r "${TMPDIR:-/tmp}/ts-lock.$$"
    "${pip[@]}" install --no-deps --no-build-isolation -e .
    "${pip[@]}" check
    "$PYTHON" scripts/check_lock.py "${locks[@]}" "${keep[@]}" ${TS_LOCK_STRICT:+--strict}
fi

"$PYTHON" - <<'PY'
import torch
print(f"megatron_ts installed; torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
