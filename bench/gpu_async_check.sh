#!/usr/bin/env bash
# One-step-off-policy async against the synchronous loop on GPUs, same services, Qwen3-0.6B shape
# (random init: timing only), 64 samples x 256 tokens per step, two optimizer steps per step.
#   bash bench/gpu_async_check.sh 1gpu   # trainer and replica share one GPU (sync: placement colocated)
#   bash bench/gpu_async_check.sh 2gpu   # trainer on GPU 0, replica on GPU 1
# Results (JSON) go to $OUT, else bench/results/. Missing pure-Python wheels travel in .whl/.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/protos PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
nvidia-smi -L
# random init: the toy reward is 0, so an entropy bonus makes the gradients (and the weights) move
common=(--shape qwen3-0.6b --samples 64 --max-response 256 --steps 10 --repeats 1 --modes sync async async+tis
        --set models.policy_trainer.entropy_coef=0.01)
case "$1" in
1gpu) python3 bench/async_loop.py --trainer-device cuda:0 --rollout-devices cuda:0 "${common[@]}" \
        --out "$out/async_loop_1gpu.json" > "$out/async_loop_1gpu.log"; tail -5 "$out/async_loop_1gpu.log" ;;
2gpu) python3 bench/async_loop.py --trainer-device cuda:0 --rollout-devices cuda:1 "${common[@]}" \
        --out "$out/async_loop_2gpu.json" > "$out/async_loop_2gpu.log"; tail -5 "$out/async_loop_2gpu.log" ;;
*) echo "usage: $0 1gpu|2gpu" >&2; exit 2 ;;
esac
