#!/usr/bin/env bash
# Installs megatron_ts with its test tools from the lock and runs the test suite (CPU; GPU tests
# skip loudly). The environment is chosen by scripts/env.sh (.venv in the checkout by default).
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh
bash scripts/install.sh dev
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m pytest -p no:cacheprovider "$@"
