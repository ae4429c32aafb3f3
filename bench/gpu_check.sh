#!/usr/bin/env bash
# Every GPU-only check of the foundation in one call on a 2-GPU machine (the device tool's
# nvidia-h100-x2). The image has torch, transformers, grpcio and protobuf; the few pure-Python
# packages it lacks travel as wheels in .whl/ (omegaconf, grpcio-reflection,
# grpcio-health-checking, prometheus-client).
#   bash bench/gpu_check.sh            (results in $OUT, else bench/results/)
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/protos PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
nvidia-smi -L
python3 -c "import torch, transformers, grpc, google.protobuf as p; print(torch.__version__, transformers.__version__, grpc.__version__, p.__version__)"
python3 bench/gpu_grpo.py --trainer-device cuda:0 --rollout-devices cuda:1 --steps 8 --out "$out/gpu_grpo.json"
python3 bench/weight_sync.py --model qwen3-1.7b --trainer-device cuda:0 --rollout-device cuda:1 --iters 5 \
  --out "$out/weight_sync.json"
