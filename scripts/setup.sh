#!/usr/bin/env bash
# Create .venv and install pdmix with pinned dependencies (the CPU torch wheel first). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0          # CPU wheel first, so nothing pulls a CUDA build
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .
