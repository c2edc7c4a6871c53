#!/usr/bin/env bash
# The main job on the bundled synthetic data, on CPU: install, then
#   ts-data make-demo (a quarter of the images 2:1) -> ts-data train-vq
#   -> ts-data tokenize (32, 64, 128 px; 1:1 and 2:1 aspect-ratio buckets)
#   -> ts-train (pretrain/configs/demo.toml: 32 px s=1 -> 64 px s=2 -> 128 px s=2)
#   -> ts-convert to-hf -> ts-generate (square and 2:1) -> ts-eval shapes (both aspects)
# and prints where the images, the TensorBoard logs and the report are. docs/demo.md explains
# each step and its output.
#
# Knobs (environment; the defaults are the documented demo):
#   DEMO_OUT=demo_out        data, tokenizers, export, images and report
#   DEMO_RUN=runs/demo       training run directory (checkpoints, TensorBoard, metrics.jsonl)
#   DEMO_IMAGES=4000         make-demo samples
#   DEMO_WIDE=0.25           fraction of them drawn 2:1 ("a red circle on the left")
#   DEMO_VQ_STEPS=800        train-vq steps
#   DEMO_EVAL_LIMIT=         score only the first N prompts of ts-eval's default set
#   DEMO_SKIP_INSTALL=1      use the ts-* commands on PATH as they are (no install, no venv)
#   DEMO_TRAIN_ARGS="..."    extra ts-train overrides, e.g. "--curriculum.stages.2.steps 100"
#   DEMO_THREADS=2           torch threads of every step (the documented scores need 2)
# The install goes into the environment scripts/env.sh picks: $PYTHON's, the active virtualenv, or
# .venv in the checkout (created on first use; `source .venv/bin/activate` to use the CLIs later).
# Steps whose output exists are not redone (delete DEMO_OUT / DEMO_RUN to start over); ts-train
# resumes from its latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${DEMO_OUT:-demo_out}
RUN=${DEMO_RUN:-runs/demo}
IMAGES=${DEMO_IMAGES:-4000}
WIDE=${DEMO_WIDE:-0.25}
VQ_STEPS=${DEMO_VQ_STEPS:-800}
EVAL_LIMIT=${DEMO_EVAL_LIMIT:-}
read -r -a TRAIN_ARGS <<< "${DEMO_TRAIN_ARGS:-}"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# torch splits reductions by thread, so the thread count changes the rounding: train-vq's weights
# after 150 steps differ between 1, 2 and 4 threads. torch uses one thread per core by default;
# a fixed count gives the same bytes on any machine with at least that many cores (docs/demo.md).
export OMP_NUM_THREADS=${DEMO_THREADS:-2}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}  # megatron-core's Apex/TE notices, once per process

if [ -z "${DEMO_SKIP_INSTALL:-}" ]; then
    # shellcheck source=scripts/env.sh
    source scripts/env.sh
    bash scripts/install.sh
fi

start=$SECONDS
step() {  # step NAME: prints a banner and the time since the previous one
    echo
    echo "=== [$(( SECONDS - start ))s] $1"
}

step "make-demo: $IMAGES coloured-shape images with captions (img2dataset layout), $WIDE of them 2:1"
if [ ! -f "$OUT/raw/.complete" ]; then
    ts-data make-demo "$OUT/raw" --num "$IMAGES" --resolution 128 --seed 0 --per-shard 500 \
        --wide-fraction "$WIDE"
    touch "$OUT/raw/.complete"
fi
"${PYTHON:-python}" -m data_tools.demo_tokenizer "$OUT/demo_tokenizer.json" >/dev/null

step "train-vq: the demo's 8x VQ tokenizer, 1024 codes"
VQ="$OUT/vq/demo_vq.safetensors"
if [ ! -f "$VQ" ]; then
    ts-data train-vq "$OUT/raw" --out "$VQ" --resolution 64 --steps "$VQ_STEPS" \
        --codebook-size 1024 --downsample 8 --foreground-weight 8
fi

for R in 32 64 128; do
    step "tokenize at $R px (buckets 1:1 and 2:1)"
    ts-data tokenize --input "$OUT/raw" --output "$OUT/tokens/$R" --resolution "$R" \
        --buckets 1:1,2:1 --grid-multiple 2 \
        --vq-format native --vq-checkpoint "$VQ" --text "$OUT/demo_tokenizer.json" >/dev/null
done

step "ts-train: pretrain/configs/demo.toml (3 stages)"
ts-train --config pretrain/configs/demo.toml \
    --job.run_dir "$RUN" \
    --tokenizer.text "$OUT/demo_tokenizer.json" \
    --tokenizer.vq_checkpoint "$VQ" \
    --curriculum.stages.0.sources.0.url "$OUT/tokens/32" \
    --curriculum.stages.1.sources.0.url "$OUT/tokens/64" \
    --curriculum.stages.2.sources.0.url "$OUT/tokens/128" \
    "${TRAIN_ARGS[@]}"

step "ts-convert to-hf"
rm -rf "$OUT/export"
ts-convert to-hf "$RUN" "$OUT/export"

step "ts-generate: four prompts"
ts-generate --model "$OUT/export" --out "$OUT/images" --no-progress \
    --prompt "a red circle in the top left" \
    --prompt "a blue square in the center" \
    --prompt "a green triangle in the bottom right" \
    --prompt "a yellow cross in the top right"
ts-generate --model "$OUT/export" --out "$OUT/images" --no-progress --size 2:1 \
    --prompt "a red circle on the left and a blue square on the right"

step "ts-eval shapes: colour, shape, position and count of generated images"
ts-eval shapes --model "$OUT/export" --out "$OUT/eval" --aspect both \
    ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"}

step "done"
cat <<EOF
images:       $OUT/images/  (ts-generate) and $OUT/eval/images/ (ts-eval)
report:       $OUT/eval/report.json and $OUT/eval/report.html
TensorBoard:  tensorboard --logdir $RUN/tensorboard
metrics:      $RUN/metrics.jsonl
checkpoints:  $RUN/checkpoints/   export: $OUT/export/
EOF
