#!/usr/bin/env bash
# GPU call 1 of 2 (benchmarks/gpu/README.md). Carry: .gpu/p1 .gpu/setup-on-device.sh .gpu/shape .whl
#   1. installs the pinned transformers/peft wheels into /tmp/site (they stay for call 2)
#   2. builds a random-weight copy of SmolLM2-135M's architecture (timings do not depend on
#      the weights; the real weights arrive with call 2)
#   3. probe: step times of the tree runs of call 2, under the same parallel load
#   4. ktm bench speed (prefill, decoding, training, memory) for K = 1, 2, 4, 8
#   5. ktm bench speed --modes compile: torch.compile / CUDA graphs against eager
# Everything is written under $WORK/res1 and packed into $OUT/call1.tgz; each step has a
# time limit so that the call ends inside its 600 s.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out1}
WORK=${WORK:-/tmp}   # the device's scratch folder: model folders, the probe, results
RES=$WORK/res1
mkdir -p "$OUT" "$RES"
LIMIT=${LIMIT:-430}   # seconds this script may use in all (device time is short: see README)
left() { local l=$((LIMIT - SECONDS)); echo $((l < $1 ? l : $1)); }

. .gpu/setup-on-device.sh 2>/dev/null || echo "setup: first half of the model stored (the second comes with call 2)"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, peft, accelerate, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
  nproc; date -u
} 2>&1 | tee "$RES/machine.txt"

python3 benchmarks/gpu/model_folder.py .gpu/shape "$WORK"/smol-rand || exit 1

echo "== probe ($SECONDS s)"
timeout "$(left 75)" python3 benchmarks/gpu/tree_runs.py probe --model "$WORK"/smol-rand --out "$WORK"/probe \
  --steps 30 --deadline 60 2>&1 | tail -25 | tee "$RES/probe.log"
cp "$WORK"/probe/probe.json "$RES/" 2>/dev/null

echo "== speed ($SECONDS s)"
timeout "$(left 170)" python3 -m ktm.experiments.bench speed --device cuda --model "$WORK"/smol-rand \
  --out "$RES/speed" > "$RES/speed.log" 2>&1
tail -n 90 "$RES/speed.log"

echo "== compile reduce-overhead ($SECONDS s)"
timeout "$(left 170)" python3 -m ktm.experiments.bench speed --device cuda --model "$WORK"/smol-rand --modes compile \
  --compile-modes reduce-overhead --batch-sizes 1 --lengths 512 1024 2048 --repeats 5 \
  --out "$RES/compile-reduce-overhead" > "$RES/compile-reduce-overhead.log" 2>&1
grep -E "^compile|Error|error" "$RES/compile-reduce-overhead.log" | tail -20

if [ $((LIMIT - SECONDS)) -gt 110 ]; then
  echo "== compile default ($SECONDS s)"
  timeout "$(left 400)" python3 -m ktm.experiments.bench speed --device cuda --model "$WORK"/smol-rand --modes compile \
    --compile-modes default --batch-sizes 1 --lengths 512 2048 --ks 1 4 --repeats 5 \
    --out "$RES/compile-default" > "$RES/compile-default.log" 2>&1
  grep -E "^compile|Error|error" "$RES/compile-default.log" | tail -12
fi
echo "== done ($SECONDS s)"
tar czf "$OUT/call1.tgz" -C "$RES" .
