#!/usr/bin/env bash
# Creates/refreshes .venv, then runs `ktm demo` on the embedded SmolLM2-135M (10-13 min on 2 CPU cores).
set -euo pipefail
. "$(dirname "$0")/env.sh"
export TOKENIZERS_PARALLELISM=false
exec ktm demo "$@"
