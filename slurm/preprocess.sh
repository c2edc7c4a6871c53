#!/usr/bin/env bash
# Submits token-shard preprocessing (docs/slurm.md): a job array of N `ts-data tokenize` ranks and
# a `ts-data merge` job that starts only when every rank succeeded.
#
#   slurm/preprocess.sh 16 --input 's3://bkt/raw/{00000..00999}.tar' --output s3://bkt/tok-512/ \
#       --resolution 512 --vq-checkpoint /shared/vq/llamagen-16.pt --vq-format llamagen
#
# Arguments: N (array tasks), then the arguments of `ts-data tokenize` (without --rank and
# --world-size). Variables: TS_SBATCH_ARGS (extra sbatch options for both jobs, e.g.
# "--partition=cpu --time=4:00:00 --cpus-per-task=8"), TS_ARRAY_THROTTLE (run at most this many
# tasks at once). Prints the two job ids as ARRAY_JOB=<id> and MERGE_JOB=<id>.
# If a rank fails, the merge job is cancelled; fix the cause and run this again: finished input
# shards are skipped.
set -euo pipefail

die() {
    echo "preprocess.sh: $*" >&2
    exit 2
}
(($# >= 2)) || die "usage: slurm/preprocess.sh N TOKENIZE-ARGS... (see the header of this file)"
tasks=$1
shift
[[ $tasks =~ ^[1-9][0-9]*$ ]] || die "N='$tasks': the number of array tasks, a positive integer"

output="" endpoint=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        --output) output=${args[i + 1]:-} ;;
        --output=*) output=${args[i]#--output=} ;;
        --endpoint-url) endpoint=(--endpoint-url "${args[i + 1]:-}") ;;
        --endpoint-url=*) endpoint=("${args[i]}") ;;
        --rank | --rank=* | --world-size | --world-size=*)
            die "${args[i]}: each array task is one rank; pass only N" ;;
    esac
done
[[ -n $output ]] || die "no --output among the tokenize arguments"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
read -r -a extra <<<"${TS_SBATCH_ARGS:-}"
array="0-$((tasks - 1))${TS_ARRAY_THROTTLE:+%$TS_ARRAY_THROTTLE}"

array_job=$(sbatch --parsable --array="$array" "${extra[@]}" "$here/preprocess.sbatch" \
    tokenize "$@")
array_job=${array_job%%;*}
merge_job=$(sbatch --parsable --job-name=ts-merge --output=%x-%j.out \
    --dependency="afterok:${array_job}" --kill-on-invalid-dep=yes "${extra[@]}" \
    "$here/preprocess.sbatch" merge "$output" "${endpoint[@]}")
merge_job=${merge_job%%;*}
echo "ARRAY_JOB=${array_job}"
echo "MERGE_JOB=${merge_job}"
echo "preprocess.sh: ${tasks} tokenize tasks in array job ${array_job}; merge job ${merge_job} \
writes manifest.json under ${output} after all of them succeed" >&2
