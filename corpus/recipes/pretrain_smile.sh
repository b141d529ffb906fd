#!/usr/bin/env bash
# Pre-train both directions on a seeded subsample of smile (SmileChat, CC0), then fine-tune them on the
# chit-chat store with --init, and report the held-out perplexities. This is the CPU plan of a two-stage
# recipe; README.md, "Pre-training on smile", says what it gave against chit-chat only (it is not part of
# the shipped default: see there).
#
#   bash corpus/recipes/pretrain_smile.sh [CORPUS_DIR] [OUT_DIR] [DEVICE]      (run from the repository root)
#
# Settings (environment variables):
#   SHARE=0.15            share of smile's sessions kept (preprocess --subsample smile=SHARE): 8,268
#                         sessions, 5.7 M train tokens
#   PRETRAIN_STEPS=950    pre-training steps of 8,192 tokens per direction: ~2 h on one CPU core each
#                         (~1,100 tokens/s), the two directions side by side on 2 cores; 7.8 M tokens, about
#                         1.4 passes over the subsample
#   FINETUNE_STEPS=500    chit-chat steps per direction (stage 1 of corpus/recipes/default.sh)
#   STORE=DIR             an existing chit-chat store to reuse (else it is built from default_store.json)
# The measured run (README) was PRETRAIN_STEPS=250 FINETUNE_STEPS=500, forward only, against 750 chit-chat
# steps from scratch (the same compute).
#
# Both stages use the chit-chat store's tokenizer (--vocab), so the fine-tune data has no [UNK] and --init
# loads; smile's characters outside it become [UNK] (0.02 % of its tokens). Both stages replay the stage-1
# configs (corpus/recipes/default_stage1_*.json: small preset, lr 5e-4, dropout 0.1), with --max-steps.
set -euo pipefail
CORPUS=${1:-../shared/corpus}; OUT=${2:-runs/pretrain_smile}; DEVICE=${3:-}
PY=${PYTHON:-python}
HERE=$(dirname "$0")
SHARE=${SHARE:-0.15}; PRETRAIN_STEPS=${PRETRAIN_STEPS:-950}; FINETUNE_STEPS=${FINETUNE_STEPS:-500}
EVAL_LIMIT=${EVAL_LIMIT:-0}
EXTRA=(); [[ -n $DEVICE ]] && EXTRA+=(--device "$DEVICE"); [[ -n ${PRESET:-} ]] && EXTRA+=(--preset "$PRESET")

# 1. the chit-chat store (as corpus/recipes/default.sh builds it) and the smile subsample with its tokenizer
STORE=${STORE:-}
if [[ -z $STORE ]]; then
  STORE=$OUT/store
  mapfile -t INPUTS < <($PY -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["inputs"]))' \
      "$HERE/default_store.json")
  INPUTS=("${INPUTS[@]/#..\/shared\/corpus/$CORPUS}")
  $PY -m dialogpt_zh.preprocess --config "$HERE/default_store.json" --output "$STORE" "${INPUTS[@]}"
fi
$PY -m dialogpt_zh.preprocess "$CORPUS/smile" --subsample "smile=$SHARE" --vocab "$STORE/tokenizer" \
    --output "$OUT/smile_store"

# 2. pre-train, then fine-tune, each direction on its own core (the configs say --threads 1)
run_direction() {  # direction
  $PY -m dialogpt_zh.train --config "$HERE/default_stage1_$1.json" --data "$OUT/smile_store" \
      --output "$OUT/pretrain/$1" --max-steps "$PRETRAIN_STEPS" "${EXTRA[@]}"
  $PY -m dialogpt_zh.train --config "$HERE/default_stage1_$1.json" --data "$STORE" --init "$OUT/pretrain/$1" \
      --output "$OUT/bot/$1" --max-steps "$FINETUNE_STEPS" "${EXTRA[@]}"
}
run_direction forward > "$OUT/forward.log" 2>&1 & forward_pid=$!
run_direction backward > "$OUT/backward.log" 2>&1 & backward_pid=$!
status=0
wait $forward_pid || { echo "forward failed: see $OUT/forward.log" >&2; status=1; }
wait $backward_pid || { echo "backward failed: see $OUT/backward.log" >&2; status=1; }
[[ $status == 0 ]] || exit $status

# 3. held-out perplexity of the forward model (compare with the same evaluation of another run)
$PY -m dialogpt_zh.evaluate --data "$CORPUS/lccc-sample/toy_data.json" --split valid --model "$OUT/bot/forward" \
    --decoders none --no_selection --threads 1 --seed 0 --limit $EVAL_LIMIT --output "$OUT/ppl_lccc.json"
$PY -m dialogpt_zh.evaluate --data "$CORPUS/kdconv" --split test --last-turn-only --model "$OUT/bot/forward" \
    --decoders none --no_selection --threads 1 --seed 0 --limit $EVAL_LIMIT --output "$OUT/ppl_kdconv.json"
echo "done: models in $OUT/bot; held-out perplexity in $OUT/ppl_lccc.json and $OUT/ppl_kdconv.json"
