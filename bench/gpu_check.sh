#!/usr/bin/env bash
# The GPU check (issue 15): at most 8 minutes on one GPU, no network. Prints one table.
#   bash bench/gpu_check.sh            # CUDA, a random model at Qwen2.5-0.5B's shape
#   bash bench/gpu_check.sh --tiny --device cpu   # the same parts on a tiny model, on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 POSTTRAIN_NO_PROGRESS=1
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec timeout 480 "$PY" bench/gpu_check.py --budget 450 "$@"
