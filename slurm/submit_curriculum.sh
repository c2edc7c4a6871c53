#!/usr/bin/env bash
# Submits a long run (all curriculum stages of one config) as a chain of time-limited jobs
# (docs/slurm.md). The trainer itself walks through the stages and resumes from
# <run_dir>/checkpoints/latest; each job of the chain is one segment of wall time.
#
#   TS_SBATCH_ARGS="--nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 \
#       --time=24:00:00" slurm/submit_curriculum.sh --segments 30 \
#       pretrain/configs/paper_2.7B.toml --job.run_dir /shared/runs/ts-2.7b
#
# Segment k+1 starts after segment k ends successfully (--dependency=afterok): a segment ends
# successfully when training finished or when it checkpointed on its time-limit signal (exit 75
# becomes 0 under TS_CHAIN=1). The segment that finishes training cancels the segments still
# pending; a segment that fails for a real error (exit 1-6) leaves the rest with a dependency that
# can never be met, and --kill-on-invalid-dep cancels them. Nothing requeues itself in a chain.
#
# Arguments: [--segments N] (default 10) CONFIG [--section.key value ...].
# Variables: TS_SBATCH_ARGS (sbatch options of every segment: nodes, GPUs, time, partition, ...),
# TS_JOB_NAME (default ts-<config name>-<date>), plus those of slurm/train.sbatch (TS_DEVICE, ...),
# which sbatch passes on. Prints the job ids, one per line, as SEGMENT_JOB=<id>.
set -euo pipefail

die() {
    echo "submit_curriculum.sh: $*" >&2
    exit 2
}
segments=10
if [[ ${1:-} == --segments ]]; then
    segments=${2:-}
    shift 2 || die "--segments needs a number"
elif [[ ${1:-} == --segments=* ]]; then
    segments=${1#--segments=}
    shift
fi
[[ $segments =~ ^[1-9][0-9]*$ ]] || die "--segments '$segments': a positive integer"
(($# >= 1)) || die "usage: slurm/submit_curriculum.sh [--segments N] CONFIG [overrides...]"
config=$1
shift
[[ -f $config ]] || die "config '$config' not found"
command -v ts-train >/dev/null || die "ts-train is not on PATH: activate the environment first"

# Validate before anything waits in the queue: a bad config fails here, not after hours of waiting.
plan=$(ts-train --config "$config" "$@" --dry-run) || die "ts-train --dry-run rejected the config \
(message above); nothing submitted"
python3 - "$plan" <<'EOF' >&2
import json, sys
plan = json.loads(sys.argv[1])
for s in plan["stages"]:
    print(f"  stage {s['name']}: {s['steps']} steps at {s['resolution']} px, "
          f"s = {s['shuffle_window']}")
EOF

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
stem=$(basename "$config" .toml)
name=${TS_JOB_NAME:-ts-${stem}-$(date +%m%d-%H%M%S)}
read -r -a extra <<<"${TS_SBATCH_ARGS:-}"

prev=""
for ((k = 1; k <= segments; k++)); do
    dep=()
    [[ -n $prev ]] && dep=(--dependency="afterok:${prev}" --kill-on-invalid-dep=yes)
    prev=$(sbatch --parsable --job-name="$name" --export=ALL,TS_CHAIN=1 "${dep[@]}" \
        "${extra[@]}" "$here/train.sbatch" "$config" "$@")
    prev=${prev%%;*}
    echo "SEGMENT_JOB=${prev}"
done
echo "submit_curriculum.sh: ${segments} segments of '${name}' submitted; squeue -n ${name}" >&2
