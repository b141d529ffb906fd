#!/usr/bin/env bash
# Rebuild the embedded default models (checkpoints/default) by replaying their recorded configs, then
# evaluate them on the held-out sessions. See README.md, "Default models".
#
#   bash corpus/recipes/default.sh [CORPUS_DIR] [OUT_DIR] [DEVICE]      (run from the repository root)
#
# What it does, exactly:
#   1. two stores from the same inputs: `preprocess --config corpus/recipes/default_store.json` (lccc-sample +
#      lccc-base + gpt2-chitchat-50w + KdConv + ChatterBot, held-out source splits left out; its inputs
#      re-rooted at CORPUS_DIR, default ../shared/corpus) and the same with `--upsample kdconv=8`
#      (`default_store_stage3.json`: KdConv's train windows written 8 times; same tokenizer, same valid/test);
#   2. stage 1, both models: `train --config corpus/recipes/default_stage1_$direction.json` (500 steps of
#      8,192 tokens, lr 5e-4, dropout 0.1);
#   3. stage 2 with --init STAGE1: `default_stage2_$direction.json` (both: 1,100 more steps of 4,096 tokens,
#      lr 1e-3 warm restart, dropout 0);
#   4. stage 3, both models, with --init STAGE2 on the upsampled store: `default_stage3_$direction.json` (800
#      steps of 4,096 tokens, lr 5e-4); the forward model is done here (its config is its card's);
#      every stage's config is committed here; in 2-4 only --data/--output/--init (and --device when DEVICE
#      is given) are replaced;
#   4a. the backward model is stage 2 and stage 3 averaged, (1 - w) * stage 2 + w * stage 3 with
#      w = BACKWARD_STAGE3_WEIGHT (corpus/recipes/average_models.py): stage 3 alone selects far better on
#      KdConv and worse on LCCC; the average is better on both (docs/default_models.md);
#   4b. the retrieval index of human replies from the store's train split (`python -m dialogpt_zh.index`,
#      GPT2-chitchat's corpus left out: no licence to quote it);
#   5. the README's held-out evaluation (plain, mmi, greedy, retrieval and hybrid decoders).
# Time on 2 CPU cores (1 thread per run, the two directions side by side): ~70 min for stage 1, ~60 min
# for stage 2 and ~50-60 min for stage 3 (~900-1,200 tokens/s per run); not measured on a GPU (an estimate
# from the previous sweep's H100 throughput: a few minutes per direction).
# The replay gives the same settings and the same LR schedule (tests/test_train.py checks the cards).
# A CPU rebuild of a CPU-trained card with the same torch version repeats the run; on other hardware or
# precision the weights come out close but not bit-identical. A card of a run that was stopped early by a
# time bound (an interrupted run) replays to its full configured length, not to where it was stopped:
# the card's "trained_steps" says where that was.
set -euo pipefail
CORPUS=${1:-../shared/corpus}; OUT=${2:-runs/default}; DEVICE=${3:-}
PY=${PYTHON:-python}
HERE=$(dirname "$0")
# Overridable only to smoke-test this script quickly (e.g. PRESET=tiny MAX_STEPS=20 EVAL_LIMIT=5):
SMOKE=(); [[ -n ${PRESET:-} ]] && SMOKE+=(--preset "$PRESET"); [[ -n ${MAX_STEPS:-} ]] && SMOKE+=(--max-steps "$MAX_STEPS")
EVAL_LIMIT=${EVAL_LIMIT:-0}
DEVICE_FLAG=(); [[ -n $DEVICE ]] && DEVICE_FLAG=(--device "$DEVICE")

# 1. stores: the recorded inputs, re-rooted at CORPUS (held-out source splits are left out by the configs)
mapfile -t INPUTS < <($PY -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["inputs"]))' \
    "$HERE/default_store.json")
INPUTS=("${INPUTS[@]/#..\/shared\/corpus/$CORPUS}")
$PY -m dialogpt_zh.preprocess --config "$HERE/default_store.json" --output "$OUT/store" "${INPUTS[@]}"
$PY -m dialogpt_zh.preprocess --config "$HERE/default_store_stage3.json" --output "$OUT/store_kd8" "${INPUTS[@]}"

# 2.-4. forward and backward models (the backward one reads the windows reversed)
train() {  # config, store, output, [init]
  $PY -m dialogpt_zh.train --config "$1" --data "$2" --output "$3" ${4:+--init "$4"} "${DEVICE_FLAG[@]}" "${SMOKE[@]}"
}
for direction in forward backward; do
  train "$HERE/default_stage1_$direction.json" "$OUT/store" "$OUT/stage1/$direction"
done
for direction in forward backward; do
  train "$HERE/default_stage2_$direction.json" "$OUT/store" "$OUT/stage2/$direction" "$OUT/stage1/$direction"
done
train "$HERE/default_stage3_forward.json" "$OUT/store_kd8" "$OUT/bot/forward" "$OUT/stage2/forward"
train "$HERE/default_stage3_backward.json" "$OUT/store_kd8" "$OUT/stage3/backward" "$OUT/stage2/backward"

# 4a. the backward model: stages 2 and 3 averaged (the weight recorded in the installed card)
BACKWARD_STAGE3_WEIGHT=0.25
$PY "$HERE/average_models.py" "$OUT/stage2/backward" "$OUT/stage3/backward" --weight $BACKWARD_STAGE3_WEIGHT \
    --output "$OUT/bot/backward" --overwrite

# 4b. the index of human replies (train split only; GPT2-chitchat's corpus states no licence, so its text is
#     not quoted: left out of the index, as in the shipped default)
$PY -m dialogpt_zh.index --data "$OUT/store" --output "$OUT/bot/retrieval" --exclude_sources gpt2-chitchat-50w --overwrite

# 5. held-out evaluation (the README's table)
$PY -m dialogpt_zh.evaluate --data "$CORPUS/lccc-sample/toy_data.json" --split valid --model "$OUT/bot" \
    --decoders plain,mmi,greedy,retrieval,hybrid --sweep --seed 0 --limit $EVAL_LIMIT "${DEVICE_FLAG[@]}" \
    --output "$OUT/heldout_lccc.json" --markdown "$OUT/heldout_lccc.md" --samples "$OUT/heldout_lccc.jsonl"
$PY -m dialogpt_zh.evaluate --data "$CORPUS/kdconv" --split test --last-turn-only --model "$OUT/bot" \
    --decoders plain,mmi,greedy,retrieval,hybrid --seed 0 --limit $EVAL_LIMIT "${DEVICE_FLAG[@]}" \
    --output "$OUT/heldout_kdconv.json" --markdown "$OUT/heldout_kdconv.md" --samples "$OUT/heldout_kdconv.jsonl"
echo "done: models in $OUT/bot; install them with: python $HERE/pick_default.py --install $OUT/bot checkpoints/default"
