#!/usr/bin/env bash
# Create a virtual environment from nothing and install kd into it (editable, with the dev extra).
#   scripts/setup.sh            -> .venv         torch 2.13.0 (installed FIRST, so nothing pulls a multi-GB CUDA build)
#   scripts/setup.sh vision     -> .venv-vision  torch 2.14.1 + torchvision 0.29.1, needed by transformers'
#                                  LLaVA-OneVision / Qwen2-VL processors (the CPU torch 2.13 wheel has no torchvision)
# Idempotent: an up-to-date venv (same pyproject.toml and flavour) is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-base}"
case "$flavour" in
  base)   venv=.venv;        torch_pkgs=("${KD_TORCH:-torch==2.13.0}") ;;
  vision) venv=.venv-vision; torch_pkgs=("torch==2.14.1" "torchvision==0.29.1") ;;
  *) echo "usage: scripts/setup.sh [base|vision], got $flavour" >&2; exit 2 ;;
esac
stamp="$venv/.kd-stamp"
want="$flavour $(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/kd" ]; then
  exit 0
fi
python3 -m venv "$venv"
log="$venv/setup.log"
pip_install() {  # pip's output goes to the log; shown only if it fails
  "$venv/bin/python" -m pip --disable-pip-version-check install "$@" >>"$log" 2>&1 \
    || { tail -40 "$log" >&2; echo "[setup] pip install $* failed (full log: $log)" >&2; exit 1; }
}
echo "[setup] $venv: installing ${torch_pkgs[*]} first, then kd[dev]" >&2
pip_install --upgrade pip
pip_install "${torch_pkgs[@]}"
pip_install -e ".[dev]"
"$venv/bin/python" -c "import torch, kd_cache, kd_train, kd_cli, pytest"
echo "$want" > "$stamp"
