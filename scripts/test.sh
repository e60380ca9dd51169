#!/usr/bin/env bash
# Creates/refreshes .venv and runs the default test suite, then scripts/test-floors.sh: a subset of
# the tests on the oldest dependency versions pyproject.toml accepts, in .venv-floors. Offline;
# < 10 min on 2 CPU cores once both venvs exist.
# Extra arguments go to pytest for the main suite, e.g. `bash scripts/test.sh -m slow` for the slow
# tests. KTM_SKIP_FLOORS=1 skips the floors step.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
(
  . "$root/scripts/env.sh"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  exec python -m pytest -q "$@"
)
if [ "${KTM_SKIP_FLOORS:-0}" != 1 ]; then
  echo "[ktm] the dependency floors (scripts/test-floors.sh; KTM_SKIP_FLOORS=1 skips them)" >&2
  bash "$root/scripts/test-floors.sh"
fi
