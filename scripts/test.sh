#!/usr/bin/env bash
# Installs megatron_ts with its test tools and runs the test suite (CPU; GPU tests skip loudly).
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python3}" -m pytest -p no:cacheprovider "$@"
