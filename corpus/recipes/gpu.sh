#!/usr/bin/env bash
# A bot (forward + backward model) in at most 15 minutes of one GPU machine: both directions pre-trained on
# all of smile (SmileChat, CC0; see corpus/recipes/pretrain_smile.sh for the CPU plan), then fine-tuned with
# --init on the chit-chat mix with KdConv upsampled as corpus/recipes/default.sh does it (the forward model
# on the store whose KdConv train windows are written 8 times, default_store_stage3.json; the backward model
# on the plain store, default_store.json).
#
#   bash corpus/recipes/gpu.sh [CORPUS_DIR] [OUT_DIR] [DEVICE]      (run from the repository root)
#
# NOT YET RUN ON A GPU: this recipe was written without one and only smoke-tested on CPU (the
# tiny overrides below). Its step counts come from no measurement on this code; the minute limits are what
# keeps it within 15 minutes: when a stage reaches its limit, `timeout` sends SIGTERM, the trainer stops at
# the next step boundary as on Ctrl-C (validates, saves the best model and the resume state) and the recipe
# goes on with what was saved. Each card's "trained_steps" says where its run stopped; a stopped run can be
# finished later with `python -m dialogpt_zh.train --config OUT/.../run.json --resume`.
#
# The plan (wall-clock minutes of the GPU machine; the two directions share the GPU, side by side):
#   1. stores, on the CPUs (--workers): the chit-chat store, the same with KdConv x8, and all of smile with
#      the chit-chat store's tokenizer (so --init loads; smile's characters outside it become [UNK]);
#   2. pre-training, both directions at once: PRETRAIN_EPOCHS over smile (~38 M train tokens an epoch),
#      small preset, the CUDA defaults (--batch-tokens 32768, bf16, torch.compile), lr 1e-3 (larger batches
#      than the CPU configs' 8,192 tokens at 5e-4), dropout 0.1; at most PRETRAIN_MINUTES;
#   3. fine-tuning with --init, both at once: FINETUNE_EPOCHS over the chit-chat stores, lr 5e-4; at most
#      FINETUNE_MINUTES;
#   4. the held-out perplexity of the forward model (evaluate --decoders none), as pretrain_smile.sh reports.
# Settings (environment variables): PRESET=small PRETRAIN_EPOCHS=1 FINETUNE_EPOCHS=3 PRETRAIN_MINUTES=7
# FINETUNE_MINUTES=3 WORKERS=(CPUs, at most 8) SMILE_SHARE=1 (share of smile's sessions kept); to smoke-test
# on CPU also MAX_STEPS (every training stage), BATCH_TOKENS and EVAL_LIMIT, e.g.
#   PRESET=tiny MAX_STEPS=4 SMILE_SHARE=0.002 EVAL_LIMIT=3 PRETRAIN_MINUTES=10 bash corpus/recipes/gpu.sh \
#       ../shared/corpus /tmp/gpu_smoke cpu
set -euo pipefail
CORPUS=${1:-../shared/corpus}; OUT=${2:-runs/gpu}; DEVICE=${3:-cuda}
PY=${PYTHON:-python}
HERE=$(dirname "$0")
PRESET=${PRESET:-small}; PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-1}; FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-3}
PRETRAIN_MINUTES=${PRETRAIN_MINUTES:-7}; FINETUNE_MINUTES=${FINETUNE_MINUTES:-3}
CPUS=$(nproc); WORKERS=${WORKERS:-$(( CPUS < 8 ? CPUS : 8 ))}
SMILE_SHARE=${SMILE_SHARE:-1}; EVAL_LIMIT=${EVAL_LIMIT:-0}
COMMON=(--device "$DEVICE" --preset "$PRESET" --seed 42 --dropout 0.1)
[[ -n ${MAX_STEPS:-} ]] && COMMON+=(--max-steps "$MAX_STEPS")
[[ -n ${BATCH_TOKENS:-} ]] && COMMON+=(--batch-tokens "$BATCH_TOKENS")
mkdir -p "$OUT"
SECONDS=0

# 1. stores: the recorded chit-chat inputs re-rooted at CORPUS (held-out source splits left out by the configs)
mapfile -t INPUTS < <($PY -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["inputs"]))' \
    "$HERE/default_store.json")
INPUTS=("${INPUTS[@]/#..\/shared\/corpus/$CORPUS}")
$PY -m dialogpt_zh.preprocess --config "$HERE/default_store.json" --output "$OUT/store" --workers "$WORKERS" \
    --overwrite true "${INPUTS[@]}"
$PY -m dialogpt_zh.preprocess --config "$HERE/default_store_stage3.json" --output "$OUT/store_kd8" \
    --workers "$WORKERS" --overwrite true "${INPUTS[@]}"
SUBSAMPLE=(); [[ $SMILE_SHARE != 1 ]] && SUBSAMPLE=(--subsample "smile=$SMILE_SHARE")
$PY -m dialogpt_zh.preprocess "$CORPUS/smile" "${SUBSAMPLE[@]}" --vocab "$OUT/store/tokenizer" \
    --output "$OUT/smile_store" --workers "$WORKERS" --overwrite true
echo "stores done after $((SECONDS / 60)) min $((SECONDS % 60)) s"

# 2.-3. one training stage, bounded in time: SIGTERM at the limit stops it at a step boundary, saved (exit 143)
bounded() {  # minutes, log, train arguments...
  local minutes=$1 log=$2 status=0
  shift 2
  timeout --preserve-status --signal TERM --kill-after 120 "${minutes}m" \
      $PY -m dialogpt_zh.train "$@" > "$log" 2>&1 || status=$?
  if [[ $status != 0 && $status != 143 ]]; then
    echo "training failed (exit $status): see $log" >&2
    return 1
  fi
  [[ $status == 143 ]] && echo "stopped at the $minutes-minute limit (saved): see $log"
  return 0
}
side_by_side() {  # stage name, then one command line per direction via the function named in $2
  local pids=() status=0
  for direction in forward backward; do
    "$2" "$direction" & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  [[ $status == 0 ]] || { echo "$1 failed" >&2; exit 1; }
  echo "$1 done after $((SECONDS / 60)) min $((SECONDS % 60)) s"
}
pretrain() {  # direction
  bounded "$PRETRAIN_MINUTES" "$OUT/pretrain_$1.log" --data "$OUT/smile_store" --direction "$1" \
      --output "$OUT/pretrain/$1" --overwrite --epochs "$PRETRAIN_EPOCHS" --lr 1e-3 --eval-every 200 \
      --eval-windows 2000 "${COMMON[@]}"
}
finetune() {  # direction: the forward model on the KdConv x8 store, the backward one on the plain store
  local store=$OUT/store; [[ $1 == forward ]] && store=$OUT/store_kd8
  bounded "$FINETUNE_MINUTES" "$OUT/finetune_$1.log" --data "$store" --direction "$1" --init "$OUT/pretrain/$1" \
      --output "$OUT/bot/$1" --overwrite --epochs "$FINETUNE_EPOCHS" --lr 5e-4 --eval-every 100 \
      --eval-windows 2000 "${COMMON[@]}"
}
side_by_side pre-training pretrain
side_by_side fine-tuning finetune

# 4. held-out perplexity of the forward model (compare with pretrain_smile.sh's and default.sh's)
$PY -m dialogpt_zh.evaluate --data "$CORPUS/lccc-sample/toy_data.json" --split valid --model "$OUT/bot/forward" \
    --decoders none --no_selection --seed 0 --limit "$EVAL_LIMIT" --device "$DEVICE" --output "$OUT/ppl_lccc.json"
$PY -m dialogpt_zh.evaluate --data "$CORPUS/kdconv" --split test --last-turn-only --model "$OUT/bot/forward" \
    --decoders none --no_selection --seed 0 --limit "$EVAL_LIMIT" --device "$DEVICE" --output "$OUT/ppl_kdconv.json"
echo "done after $((SECONDS / 60)) min $((SECONDS % 60)) s: the bot is $OUT/bot (forward/ + backward/);" \
     "chat with: python -m dialogpt_zh.interact --model $OUT/bot"
