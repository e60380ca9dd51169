#!/usr/bin/env bash
# A fast subset of the tests on the oldest versions pyproject.toml accepts (constraints-floor.txt),
# in a separate venv, .venv-floors (Python 3.10 or 3.11: numpy 1.24 has no wheels for later ones).
# Everything installs from wheels (--only-binary :all:): a floor that would compile fails here.
# PyTorch comes from KTM_TORCH_INDEX when it is set, as in scripts/env.sh.
# Extra arguments replace the subset: `bash scripts/test-floors.sh tests/test_hub.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-floors/bin/python ] || python3 -m venv .venv-floors
. .venv-floors/bin/activate
stamp=.venv-floors/.ktm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints-floor.txt -nt "$stamp" ]; then
  echo "[ktm] installing the dependency floors into .venv-floors" >&2
  python -m pip install -q --upgrade pip >/dev/null
  torch_pin="$(grep '^torch==' constraints-floor.txt)"
  if [ -n "${KTM_TORCH_INDEX:-}" ]; then
    python -m pip install -q --only-binary :all: "$torch_pin" --index-url "$KTM_TORCH_INDEX"
  fi
  python -m pip install -q --only-binary :all: -c constraints-floor.txt -e ".[test]"
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python - <<'PY'
import importlib.metadata as md
names = ["torch", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors", "numpy", "gguf"]
print("[ktm] floors:", ", ".join(f"{n} {md.version(n)}" for n in names))
PY
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
# the subset (about 2 min on 2 idle cores): building, saving and loading models (local folders and the
# hub cache), generation, training, resuming, reporting and config files, export with the LoRA merged,
# the CLI's train/eval/generate/resume. Left out: the embedded model (-m 'not integration'), the
# longest training test, and the curriculum / phase tests (ktm's own round logic on the same steps).
exec python -m pytest -q -p no:cacheprovider -m "not slow and not integration" \
  -k "not learns_a_tiny_task and not curriculum_round and not curriculum_repeats and not phase_trains" \
  tests/test_packaging.py tests/test_hub.py tests/test_checkpoint.py tests/model/test_model.py \
  tests/train/test_trainer.py tests/train/test_run_hygiene.py tests/serve/test_export.py \
  tests/cli/test_cli.py::test_train_eval_generate_resume
