#!/usr/bin/env bash
# Which transformers releases load a megatron_ts export (docs/conversion.md): exports made by the
# main environment are loaded with AutoModelForCausalLM(trust_remote_code=True) in one clean venv
# per transformers release, holding torch (linked from the main environment) + transformers only.
#
#   bash scripts/hf_compat.sh [VERSION ...]
#     VERSION: an exact transformers release (4.46.0), `oldest` (OLDEST below), `locked` (the
#     transformers==X of requirements/lock.txt, installed with the lock as constraints; without
#     the lock: the release in the main environment) or `newest` (what pip resolves today).
#     Default: oldest locked.
#
# Env: PYTHON        the main environment's python (megatron_ts installed), default `python`
#      HF_COMPAT_DIR work dir, default .compat in the checkout (venvs are reused from there)
# Exits non-zero when any release fails; logs are in $HF_COMPAT_DIR/logs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# The oldest release we promise (docs/conversion.md): setup.py's floor, and the first release
# contemporaneous with torch 2.5, which the modeling code needs (SDPA enable_gqa). On 2026-11-30
# 4.30.0, 4.36.0 and 4.40.0 passed too; 4.26.0 failed (it does not install safetensors).
OLDEST=4.45.0
PYTHON=${PYTHON:-python}
WORK=${HF_COMPAT_DIR:-$ROOT/.compat}
LOCK=requirements/lock.txt
# The reference is CPU fp32, and one thread keeps the greedy codes independent of the core count.
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export CUDA_VISIBLE_DEVICES=""

say() { printf '[hf_compat] %s\n' "$*"; }
die() { printf '[hf_compat] ERROR: %s\n' "$*" >&2; exit 1; }
tf_version() { "$1" -c 'import importlib.metadata as m; print(m.version("transformers"))'; }
now_ms() { echo $(( ${EPOCHREALTIME//[.,]/} / 1000 )); }
secs() { printf '%d.%d' $(( $1 / 1000 )) $(( $1 % 1000 / 100 )); }

[ $# -gt 0 ] || set -- oldest locked
t_start=$(now_ms)
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found; point it at the main environment"
"$PYTHON" -c "import megatron_ts" 2>/dev/null \
    || die "$PYTHON cannot import megatron_ts; set PYTHON to the main environment's python"
WORK=$(mkdir -p "$WORK" && cd "$WORK" && pwd)
mkdir -p "$WORK/logs" "$WORK/results" "$WORK/venvs"

# 1. the releases asked for, resolved to exact versions
resolve_newest() {  # what `pip install transformers` would install into a fresh environment
    "$PYTHON" -m pip install --dry-run --ignore-installed --no-deps --quiet --report - \
        transformers | "$PYTHON" -c 'import json, sys
print(json.load(sys.stdin)["install"][0]["metadata"]["version"])'
}
labels=() versions=() constraints=()
for arg in "$@"; do
    constraint=""
    case "$arg" in
        oldest) version=$OLDEST ;;
        newest)
            version=$(resolve_newest) || die "pip could not resolve the newest transformers"
            say "newest: pip resolves transformers $version" ;;
        locked)
            if [ -f "$LOCK" ]; then
                version=$(sed -n 's/^transformers==\([^ ;#]*\).*/\1/p' "$LOCK")
                [ -n "$version" ] || die "$LOCK has no transformers==X line"
                constraint=$LOCK
            else
                version=$(tf_version "$PYTHON")
                say "locked: no $LOCK, using the main environment's transformers $version"
            fi ;;
        *) version=$arg ;;
    esac
    [[ $version =~ ^[0-9]+(\.[0-9A-Za-z]+)+$ ]] \
        || die "VERSION '$arg' ($version): give an exact release X.Y.Z, oldest, locked or newest"
    labels+=("$arg") versions+=("$version") constraints+=("$constraint")
done

# 2. exports + reference numbers, made by megatron_ts in the main environment
say "reference: $PYTHON scripts/hf_compat/make_reference.py $WORK/reference"
log=$WORK/logs/reference.log
if ! "$PYTHON" scripts/hf_compat/make_reference.py "$WORK/reference" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "make_reference.py failed ($log)"
fi
say "$(tail -n 1 "$log")"

# 3. one shared directory of links to the main environment's torch and its runtime requirements,
#    and Pillow (the export's pipeline returns PIL images)
SHARED=$WORK/torch_shared
log=$WORK/logs/torch_shared.log
link_torch() {
    "$PYTHON" - "$SHARED" <<'EOF'
import importlib.metadata as md
import os
import re
import shutil
import sys
from pathlib import Path

from packaging.requirements import Requirement

# never shared: each venv gets its own from pip, or must not have them at all
EXCLUDE = {"numpy", "transformers", "megatron-core", "deepspeed", "megatron-ts"}
out = Path(sys.argv[1])
tmp = out.with_name(out.name + ".tmp")
shutil.rmtree(tmp, ignore_errors=True)
tmp.mkdir(parents=True)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


todo, seen = ["torch", "pillow"], set()  # Pillow: the export's pipeline returns PIL images
while todo:
    name = norm(todo.pop())
    if name in seen or name in EXCLUDE:
        continue
    seen.add(name)
    dist = md.distribution(name)
    for req in map(Requirement, dist.requires or []):
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
    base = Path(dist.locate_file(""))
    if dist.files is None:
        sys.exit(f"{name} has no RECORD of its files; reinstall it with pip")
    tops = {Path(f).parts[0] for f in dist.files}  # packages, modules and the .dist-info dir
    for top in sorted(tops):
        if top in ("..", "__pycache__") or top.endswith(".pth") or not (base / top).exists():
            continue  # console scripts live in ../../../bin; a .pth works only in site-packages
        if not (tmp / top).exists():
            os.symlink(base / top, tmp / top)
    print(f"{dist.metadata['Name']}=={dist.version}")
shutil.rmtree(out, ignore_errors=True)  # removes the links, never what they point to
tmp.rename(out)
EOF
}
link_torch >"$log" 2>&1 || { cat "$log" >&2; die "linking torch failed ($log)"; }
say "torch shared: $(paste -sd' ' "$log") -> $SHARED"
BASE_PY=$("$PYTHON" -c 'import sys; print(getattr(sys, "_base_executable", "") or sys.executable)')
[ -x "$BASE_PY" ] || BASE_PY=$(command -v python3)

# 4. one venv per release, reused when it holds exactly that release and the same constraints
setup_venv() {  # VENV VERSION CONSTRAINT LOG
    local venv=$1 version=$2 constraint=$3 log=$4 stamp site
    stamp="hf_compat/1 transformers==$version base=$BASE_PY shared=$SHARED"  # /N: this recipe
    [ -n "$constraint" ] && stamp+=" constraints=$(sha256sum "$constraint" | cut -c1-16)"
    if [ "$(cat "$venv/.hf_compat_stamp" 2>/dev/null)" = "$stamp" ] \
        && [ "$(tf_version "$venv/bin/python" 2>/dev/null)" = "$version" ]; then
        echo "reused"
        return 0
    fi
    rm -rf "$venv"
    "$BASE_PY" -m venv "$venv" >>"$log" 2>&1 || return 1
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
        || return 1
    echo "$SHARED" >"$site/megatron_ts_torch_shared.pth"
    if [ -e "$SHARED/setuptools" ]; then  # torch's (newer) setuptools, not the one venv bundles
        "$venv/bin/python" -m pip uninstall -y -q setuptools >>"$log" 2>&1 || return 1
    fi
    "$venv/bin/python" -m pip install --no-input --progress-bar off "transformers==$version" \
        ${constraint:+-c "$ROOT/$constraint"} >>"$log" 2>&1 || return 1
    echo "$stamp" >"$venv/.hf_compat_stamp"
    echo "installed"
}

rows=() failed=0
for i in "${!versions[@]}"; do
    label=${labels[$i]} version=${versions[$i]} constraint=${constraints[$i]}
    name=$version${constraint:+-locked}
    venv=$WORK/venvs/tf-$name log=$WORK/logs/tf-$name.log summary=$WORK/results/tf-$name.json
    : >"$log"
    rm -f "$summary"
    t0=$(now_ms)
    say "$label: venv $venv (transformers==$version${constraint:+, -c $constraint})"
    result=FAIL diff=- reason=""
    if how=$(setup_venv "$venv" "$version" "$constraint" "$log"); then
        t1=$(now_ms)
        say "$label: $how in $(secs $((t1 - t0))) s; checking exports"
        rm -rf "$venv/hf_home"
        if (cd "$WORK" && env -u PYTHONPATH PYTHONNOUSERSITE=1 HF_HUB_OFFLINE=1 \
            HF_HOME="$venv/hf_home" "$venv/bin/python" "$ROOT/scripts/hf_compat/check_export.py" \
            "$WORK/reference" --summary "$summary" >>"$log" 2>&1); then
            result=PASS
        fi
        if [ -f "$summary" ]; then
            read -r diff reason < <("$PYTHON" -c 'import json, sys
s = json.load(open(sys.argv[1]))
d = s["max_logit_diff"]
print("-" if d is None else f"{d:.2e}", s["reason"] or "")' "$summary") || true
        fi
        [ "$result" = PASS ] || reason=${reason:-$(grep -v '^\s*$' "$log" | tail -n 1)}
    else
        t1=$(now_ms)
        reason="venv/pip install failed: $(grep -E '^ERROR' "$log" | tail -n 1)"
    fi
    t2=$(now_ms)
    say "$label: transformers $version $result${reason:+: $reason}" \
        "($(secs $((t2 - t0))) s, log $log)"
    [ "$result" = PASS ] || failed=1
    rows+=("$label|$version|$result|$diff|$(secs $((t1 - t0)))|$(secs $((t2 - t1)))")
done

echo
table='%-10s %-12s %-6s %-15s %9s %9s\n'
# shellcheck disable=SC2059
printf "$table" requested transformers result "max logit diff" "setup s" "check s"
for row in "${rows[@]}"; do
    IFS='|' read -r label version result diff setup check <<<"$row"
    # shellcheck disable=SC2059
    printf "$table" "$label" "$version" "$result" "$diff" "$setup" "$check"
done
say "total $(secs $(( $(now_ms) - t_start ))) s; results in $WORK/results"
exit "$failed"
