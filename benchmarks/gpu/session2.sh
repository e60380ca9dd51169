#!/usr/bin/env bash
# GPU call 2 of 2 (benchmarks/gpu/README.md), on the machine call 1 left warm.
# Carry: .gpu/p2 .gpu/setup-on-device.sh .gpu/shape
#   1. assembles the embedded model (setup-on-device.sh) and saves it once as a plain
#      float32 folder, so that every training process loads it in seconds
#   2. the tree task at scale: K = 1 and K = 4 with the fast recipe, K = 4 with the
#      hierarchical recipe, seeds 0 and 1, stage small then xsmall, all six in parallel,
#      step counts chosen from call 1's probe to end within BUDGET seconds
# Results (histories, configs, logs; no weights) are packed into $OUT/call2.tgz.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out2}
BUDGET=${BUDGET:-230}
WORK=${WORK:-/tmp}   # the scratch folder of session1.sh (it holds the probe)
mkdir -p "$OUT"
. .gpu/setup-on-device.sh || { echo "setup failed: the machine of call 1 is gone (repeat call 1)"; exit 1; }
[ -d /tmp/site/transformers ] || { echo "the wheels of call 1 are gone (repeat call 1)"; exit 1; }
export PYTHONPATH=/tmp/site:$PYTHONPATH
python3 benchmarks/gpu/model_folder.py .gpu/shape "$WORK"/smol-hf --gguf "$KTM_SMOLLM2_GGUF" 2>&1 | tail -1 || exit 1
if [ -s "$WORK"/probe/probe.json ]; then timing="--probe $WORK/probe/probe.json"
else timing="--plain-s ${PLAIN_S:-0.25} --teacher-s ${TEACHER_S:-0.5}"; echo "no probe from call 1: $timing"; fi
python3 benchmarks/gpu/tree_runs.py run --model "$WORK"/smol-hf --out "$WORK"/runs --budget "$BUDGET" --grace 20 \
  $timing 2>&1 | tee "$OUT/tree_runs.log"
tar czf "$OUT/call2.tgz" -C "$WORK"/runs summary
