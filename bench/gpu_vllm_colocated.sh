#!/usr/bin/env bash
# vLLM colocated with the trainer on one GPU (issue 13), after vLLM 0.26.0 was brought to /root/vl/ as for
# bench/gpu_vllm_check.sh (the pieces of ../shared/gpu-vllm/prepare.sh): reinstalls it if needed, then runs
# bench/gpu_colocated.py's colocated part with models.policy.engine=vllm and enable_sleep_mode: the weights
# over gloo vs CUDA IPC into vLLM's worker, with and without sleep(2)/wake_up and the trainer's Offload.
#   bash bench/gpu_vllm_colocated.sh          (one GPU; results in $OUT, else bench/results/)
set -euo pipefail
if ls /root/vl/vllm.part* >/dev/null 2>&1; then
  cat /root/vl/vllm.part* > /root/vl/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl && rm /root/vl/vllm.part*
fi
[ -d /tmp/vsite/vllm ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vsite /root/vl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:/tmp/vsite:$PWD:$PWD/protos PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0
export OUT=${OUT:-bench/results}
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
python3 bench/gpu_colocated.py --engine vllm --parts colocated --variants gloo ipc ipc+release "$@"
