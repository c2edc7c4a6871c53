#!/usr/bin/env bash
# Installs megatron_ts with its test tools from the lock and runs the test suite (CPU; GPU tests
# skip loudly). The environment is chosen by scripts/env.sh (.venv in the checkout by default).
#   scripts/test.sh [pytest args...]
# The suite runs in TS_TEST_WORKERS pytest-xdist workers (default: the CPU count, at most 4; 1 runs
# it in this process). Every test runs its processes with one thread each, so a 2-core machine
# runs two tests at a time. A test module goes to one worker as a whole (`--dist loadscope`): its
# module fixtures (trained runs, the Slurm cluster) are built once (docs/install.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh
bash scripts/install.sh dev
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cores=$("$PYTHON" -c "import os; print(len(os.sched_getaffinity(0)))")
workers=${TS_TEST_WORKERS:-$((cores < 4 ? cores : 4))}
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist loadscope)
exec "$PYTHON" -m pytest -p no:cacheprovider "${parallel[@]}" "$@"
