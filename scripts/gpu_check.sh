#!/usr/bin/env bash
# The GPU check (docs/gpu.md): every section of the CUDA path in one command, reports in --out.
#   On the GPU machine, from the checkout, with the wheels from scripts/gpu_wheels.py carried:
#     bash scripts/gpu_check.sh --out "$OUT"
#   Anywhere, on CPU at tiny sizes (CI runs this):
#     bash scripts/gpu_check.sh --smoke --out /tmp/gpu-smoke
# The machine's own python3 (or $PYTHON) runs it; the carried wheels (.gpu-wheels, or
# $TS_GPU_WHEELS) are installed into a target folder put first on PYTHONPATH, without the index.
# --smoke uses the project's environment (scripts/env.sh) instead, unless TS_GPU_WHEELS is set:
# then it rehearses the machine on CPU with $PYTHON and the wheels (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0
for arg in "$@"; do [ "$arg" = --smoke ] && smoke=1; done
if [ "$smoke" = 1 ] && [ -z "${TS_GPU_WHEELS:-}" ]; then
    # shellcheck source=scripts/env.sh
    source scripts/env.sh
    "$PYTHON" -c "import megatron_ts" 2>/dev/null || bash scripts/install.sh dev
else
    PYTHON=${PYTHON:-python3}
    wheels=${TS_GPU_WHEELS:-.gpu-wheels}
    if compgen -G "$wheels/*.whl" >/dev/null; then
        site=${TS_GPU_SITE:-/tmp/ts-gpu-site}
        start=$(date +%s)
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --disable-pip-version-check --target "$site" "$wheels"/*.whl
        echo "gpu_check: installed $(ls "$wheels"/*.whl | wc -l) carried wheels into $site" \
            "in $(( $(date +%s) - start )) s"
        export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: no wheels in $wheels (scripts/gpu_wheels.py makes them);" \
            "using what $PYTHON has" >&2
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
