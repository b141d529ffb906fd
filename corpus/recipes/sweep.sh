#!/usr/bin/env bash
# Held-out sweep used to choose the default models' data mix and size (see README "Default models").
# Builds two stores (with / without the subtitles), trains forward + backward models of two shapes on each,
# all in parallel (meant for one GPU; works on CPU but takes many hours), then evaluates every pair on the
# held-out sessions (lccc-sample toy_data.json "valid" + KdConv test.json, never trained on).
#   usage: bash corpus/recipes/sweep.sh CORPUS_DIR OUT_DIR [DEVICE] [MAX_STEPS] [EVAL_LIMIT] [DROPOUT]
# Every run is bounded by steps (not by time), so its OUT_DIR/NAME/DIRECTION/run.json rebuilds it exactly:
#   python -m dialogpt_zh.train --config OUT_DIR/NAME/forward/run.json --output REBUILT/forward
# Runs are named STORE_SHAPE_dpDROPOUT (e.g. base_small_dp0.2); pick one with corpus/recipes/pick_default.py.
set -euo pipefail
CORPUS=${1:?corpus dir, e.g. ../shared/corpus}; OUT=${2:?output dir}; DEVICE=${3:-cuda}; STEPS=${4:-2600}
LIMIT=${5:-0}; DROPOUT=${6:-0.1}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
common=(--holdout-source-splits valid,test --seed 42 --no_progress)
$PY -m dialogpt_zh.preprocess "$CORPUS/lccc-sample" "$CORPUS/kdconv" "$CORPUS/chatterbot-zh" \
    --output "$OUT/store_base" "${common[@]}" > "$OUT/preprocess_base.log" 2>&1
$PY -m dialogpt_zh.preprocess "$CORPUS/lccc-sample" "$CORPUS/kdconv" "$CORPUS/chatterbot-zh" \
    "$CORPUS/subtitles-dgk" --output "$OUT/store_subs" "${common[@]}" > "$OUT/preprocess_subs.log" 2>&1

declare -A SHAPE=([small]="--preset small" [mid]="--preset small --n-layer 6 --n-embd 384 --n-head 6")
names=()
pids=()
for store in base subs; do
  for shape in small mid; do
    name=${store}_${shape}_dp${DROPOUT}
    names+=("$name")
    for dir in forward backward; do
      # the best checkpoint so far is always on disk (saved atomically); run.json records the full config
      $PY -m dialogpt_zh.train --data "$OUT/store_$store" --direction $dir \
        --output "$OUT/$name/$dir" ${SHAPE[$shape]} --dropout "$DROPOUT" --max-steps "$STEPS" --patience 4 \
        --eval-every 100 --batch-tokens 8192 --device "$DEVICE" --seed 42 > "$OUT/train_${name}_$dir.log" 2>&1 &
      pids+=($!)
    done
  done
done
for p in "${pids[@]}"; do wait "$p" || echo "a training run ended with $?"; done

# held-out perplexity and response selection (with the MMI weight sweep) for every pair, in parallel
pids=()
for name in "${names[@]}"; do
  $PY -m dialogpt_zh.evaluate --data "$CORPUS/lccc-sample/toy_data.json" "$CORPUS/kdconv" --split valid,test \
    --model "$OUT/$name" --decoders none --sweep --limit "$LIMIT" --device "$DEVICE" --seed 0 --no_progress \
    --output "$OUT/eval_$name.json" --markdown "$OUT/eval_$name.md" > "$OUT/eval_$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || echo "an evaluation ended with $?"; done
