#!/usr/bin/env bash
# Wheels for running kd on this workplace's GPU machine (nvidia-h200: Python 3.12, x86-64, no network there), for
# benchmarks/gpu_check.py and other kd commands. Downloads them into .whl/ (git-ignored; ~7 MB) from here.
#
#   bash benchmarks/gpu_wheels.sh [EXTRA==VERSION ...]
#
# The machine's image already holds everything benchmarks/gpu_check.py imports (torch, transformers, accelerate,
# pyarrow, typer, pillow, pyyaml, tokenizers, fsspec, safetensors, aiohttp, requests, tqdm, nvidia-ml-py; see
# /work/.library/device/KINDS.md), so the check runs without .whl. What the image lacks from kd's declared
# dependencies (pyproject.toml) is fetched here: zstandard (declared; kd's code never imports it, pyarrow does
# the zstd), datasets (kd_cache/data.py imports it only for .parquet data, saved dataset folders and hf://), and
# datasets' dill and multiprocess. DeepSpeed cannot travel this way (no binary wheel: it builds at install time),
# so the DeepSpeed configs are skipped by the check.
#
# Install on the machine (first thing in the `run` command, with carry: [".whl"]):
#   if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile \
#     --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit; fi; export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(zstandard==0.25.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 "$@")
mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
