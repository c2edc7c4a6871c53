# shellcheck shell=bash
# Picks the Python environment that scripts/install.sh, demo.sh and test.sh install into and run
# from, and puts it first on PATH (so ts-train, ts-data, ... are its console scripts). Sourced.
#
#   PYTHON=/path/to/python   that interpreter's environment, as it is (your own venv or conda env)
#   an active virtualenv     $VIRTUAL_ENV, when no PYTHON is given
#   otherwise                the project's own virtualenv $TS_VENV (default .venv in the checkout),
#                            created with python3 when missing: a fresh machine never installs into
#                            the system Python (which Debian and Ubuntu refuse anyway, PEP 668)
#
# Exports PYTHON, PATH and, unless already set, TORCH_EXTENSIONS_DIR inside a virtual environment:
# DeepSpeed's CPU accelerator JIT-builds a shared-memory extension into it, and one built by
# another environment is rebuilt on every process start (26-66 s each on 2 cores).

ts_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ -n "${PYTHON:-}" ]; then
    command -v "$PYTHON" >/dev/null || { echo "PYTHON=$PYTHON: no such interpreter" >&2; exit 2; }
elif [ -n "${VIRTUAL_ENV:-}" ]; then
    PYTHON="$VIRTUAL_ENV/bin/python"
    [ -x "$PYTHON" ] || { echo "VIRTUAL_ENV=$VIRTUAL_ENV holds no bin/python" >&2; exit 2; }
else
    TS_VENV=${TS_VENV:-$ts_root/.venv}
    if [ ! -x "$TS_VENV/bin/python" ]; then
        base=${TS_BASE_PYTHON:-python3}
        "$base" - <<'PY' || { echo "megatron_ts needs Python 3.11 or 3.12 ($base is older)" >&2; exit 2; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
        echo "creating the virtual environment $TS_VENV ($("$base" --version))"
        "$base" -m venv "$TS_VENV"
    fi
    PYTHON="$TS_VENV/bin/python"
    export VIRTUAL_ENV="$TS_VENV"
fi
export PYTHON
# where this environment's console scripts go (ts-train, ...), whatever PYTHON was given as
ts_env_bin=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
case ":$PATH:" in
    *":$ts_env_bin:"*) ;;
    *) export PATH="$ts_env_bin:$PATH" ;;
esac
# only inside a virtual environment: a system prefix such as /usr is no place for a build cache
ts_prefix=$("$PYTHON" -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "")')
if [ -n "$ts_prefix" ]; then
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ts_prefix/torch_extensions}
fi
unset ts_env_bin ts_prefix
