#!/usr/bin/env bash
# Issue 13 on one GPU (device tool nvidia-h200), about 5 minutes: bench/gpu_colocated.py's colocated table for
# the built-in engine (weights over gloo vs CUDA IPC, with and without memory release) and the trainer's MFU
# variants (LM head fused or not x AdamW fused or foreach, Qwen3-1.7B shape). The image has torch,
# transformers, grpcio and protobuf; the few pure-Python packages it lacks travel as wheels in .whl/.
#   bash bench/gpu_colocated.sh        (results in $OUT, else bench/results/; extra arguments go to the script)
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/protos PYTHONUNBUFFERED=1
export OUT=${OUT:-bench/results}
nvidia-smi -L
python3 bench/gpu_colocated.py "$@"
