#!/usr/bin/env bash
# The main command: set up .venv from nothing and run `kd demo` (built-in tiny example, no downloads, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bash scripts/setup.sh base
exec .venv/bin/kd demo "$@"
