#!/usr/bin/env bash
# The vLLM checks on a 2-GPU machine (device tool nvidia-h100-x2), after the seven pieces that
# ../shared/gpu-vllm/prepare.sh makes were copied to /root/vl/ by seven earlier calls: reassembles
# and installs vLLM 0.26.0 (it pins the image's torch 2.11.0), then runs, on GPU 0 / GPU 1:
#  - GRPO with models.policy.engine=vllm: trainer on GPU 0, vLLM on GPU 1, NCCL receive into vLLM's
#    worker, bf16 agreement every step;
#  - rollout service vs the same vLLM engine in-process (0.36B Qwen3-shaped, 64 x 256 tokens), and
#    vLLM vs the built-in engine;
#  - the built-in engine vs transformers generate.
set -euo pipefail
if ls /root/vl/vllm.part* >/dev/null 2>&1; then
  cat /root/vl/vllm.part* > /root/vl/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl && rm /root/vl/vllm.part*
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vsite /root/vl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:/tmp/vsite:$PWD:$PWD/protos PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0
out=${OUT:-bench/results}
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
python3 bench/gpu_grpo.py --engine vllm --trainer-device cuda:0 --rollout-devices cuda:1 --steps 4 \
  --out "$out/gpu_grpo_vllm.json" > "$out/gpu_grpo_vllm.log" 2>&1 || { tail -60 "$out/gpu_grpo_vllm.log"; exit 1; }
grep -E '"state"|backend|max_agreement|median' "$out/gpu_grpo_vllm.json"
python3 bench/rollout_throughput.py --engine vllm --device cuda:0 --service-device cuda:1 --model qwen3-0.36b \
  --num-seqs 64 --prompt-len 64 --max-tokens 256 --compare-builtin --out "$out/rollout_vllm.json" \
  > "$out/rollout_vllm.log" 2>&1 || { tail -60 "$out/rollout_vllm.log"; exit 1; }
grep -E 'tokens_per_s|_over_' "$out/rollout_vllm.json"
python3 bench/rollout_throughput.py --engine builtin --device cuda:0 --model qwen3-0.36b --num-seqs 32 \
  --prompt-len 64 --max-tokens 128 --compare-hf --out "$out/rollout_builtin.json" > "$out/rollout_builtin.log" 2>&1 \
  || { tail -60 "$out/rollout_builtin.log"; exit 1; }
grep -E 'tokens_per_s|_over_' "$out/rollout_builtin.json"
