#!/usr/bin/env bash
# The trainer's GPU measurement as one prepared run for a machine with a GPU (a few minutes): the chit-chat store,
# then our trainer against a plain bf16 loop of the same model, eager and compiled
# (benchmarks/train_throughput.py --sections plain; target: ours >= 0.8x the compiled plain loop).
#
#   bash benchmarks/gpu_check.sh [CORPUS_DIR] [STORE_DIR]         (from the repository root)
#
# Settings (environment variables): PRESET=base STEPS=50 WARMUP=10 DEVICE=auto; on CPU, as a check of the
# script only: PRESET=tiny STEPS=5 WARMUP=2 ROWS=8 WIDTH=64 COMPILE=false DEVICE=cpu
set -euo pipefail
CORPUS=${1:-../shared/corpus}; STORE=${2:-data/base}; PY=${PYTHON:-python}
PRESET=${PRESET:-base}; STEPS=${STEPS:-50}; WARMUP=${WARMUP:-10}; DEVICE=${DEVICE:-auto}
ROWS=${ROWS:-64}; WIDTH=${WIDTH:-256}; COMPILE=${COMPILE:-true}
CPUS=$(nproc); WORKERS=$(( CPUS < 8 ? CPUS : 8 ))
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
if [[ ! -f $STORE/manifest.json ]]; then
  $PY -m dialogpt_zh.preprocess "$CORPUS/lccc-sample" "$CORPUS/kdconv" "$CORPUS/chatterbot-zh" --output "$STORE" \
      --workers "$WORKERS"
fi
$PY benchmarks/train_throughput.py --data "$STORE" --sections plain --device "$DEVICE" --plain_preset "$PRESET" \
    --plain_steps "$STEPS" --plain_warmup "$WARMUP" --plain_rows "$ROWS" --plain_width "$WIDTH" \
    --plain_compile "$COMPILE"
