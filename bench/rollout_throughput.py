"""Rollout throughput: the rollout service (gRPC, streaming) against the same engine called
in-process, same prompts, same kind of device; the built-in engine against transformers'
`generate`; vLLM against the built-in engine.

    python bench/rollout_throughput.py --engine vllm --device cuda:0 --service-device cuda:1 --model qwen3-0.36b
    python bench/rollout_throughput.py --engine builtin --device cpu --model tiny --compare-hf

The built-in engine against `generate` alone (no service), batch 32, 0.36B model, on one GPU (~1 min;
--hf-static adds generate with a static cache, which transformers compiles: a minute or two more):

    python bench/rollout_throughput.py --model qwen3-0.36b --device cuda:0 --compare-hf-only

Same prompts, same max tokens, every sequence runs to max_tokens, sampling at temperature 1 with
top-k/top-p off on both sides. `generate` is transformers' plain default (dynamic cache, eager).
Warm-up calls (CUDA graph capture, compilation) are not timed; in_process_first_call_s says what
the first call cost.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine, pin_gpu, write_result  # noqa: E402
from rlgrid.v1 import common_pb2 as pb  # noqa: E402
from rlgrid.v1 import rollout_pb2 as rpb  # noqa: E402
from rlgrid.v1 import rollout_pb2_grpc  # noqa: E402
from services.common.config import config_to_yaml, load_config  # noqa: E402
from services.common.tensors import ids_to_wire  # noqa: E402
from services.coordinator.local import LocalCluster  # noqa: E402
from services.rollout.engine import Sampling  # noqa: E402
from services.rollout.engines import build_engine  # noqa: E402

SHAPES = {
    # ~0.36B parameters, Qwen3-shaped (Qwen3-0.6B with 13 of its 28 layers)
    "qwen3-0.36b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=13,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "tiny": dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
}


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(n)]


def tokens_per_s(fn, repeats: int) -> float:
    fn()   # warm-up (CUDA graphs, allocator, first-batch effects)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="builtin", choices=["builtin", "vllm"])
    parser.add_argument("--model", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu", help="device of the in-process engine")
    parser.add_argument("--service-device", default=None, help="device of the rollout service (default: --device)")
    parser.add_argument("--num-seqs", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--compare-hf", action="store_true", help="also transformers generate (built-in engine)")
    parser.add_argument("--compare-hf-only", action="store_true",
                        help="only the built-in engine in-process against transformers generate (no service)")
    parser.add_argument("--hf-static", action="store_true",
                        help="also generate with cache_implementation='static' (compiled by transformers on GPU)")
    parser.add_argument("--compare-builtin", action="store_true", help="also the built-in engine (vllm runs)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.compare_hf_only and args.engine != "builtin":
        parser.error("--compare-hf-only compares the built-in engine: use --engine builtin")
    service_device = args.service_device or args.device
    work = tempfile.mkdtemp(prefix="rlgrid-tput-")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Qwen3Config(**SHAPES[args.model], max_position_embeddings=4096, eos_token_id=1, pad_token_id=0)
    with torch.device(device):
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(work)   # random, on disk for vLLM
    if device.type == "cuda":
        torch.cuda.empty_cache()   # vLLM sizes its KV cache from the GPU's free memory
    ps = prompts(args.num_seqs, args.prompt_len, config.vocab_size)
    # every sequence runs to max_tokens: nothing stops early, so all engines do the same work
    sampling = Sampling(temperature=1.0, max_tokens=args.max_tokens, stop_token_ids=(), seed=1)
    overrides = [f"models.policy.load={work}", f"models.policy.engine={args.engine}", "models.policy.dtype=auto",
                 f"models.policy.max_num_seqs={args.num_seqs}", f"models.policy.enforce_eager={args.enforce_eager}",
                 f"models.policy.max_prompt_tokens_length={args.prompt_len}",
                 f"models.policy.max_response_tokens_length={args.max_tokens}",
                 *(["models.policy.gpu_memory_utilization=0.6"] if args.engine == "vllm" else [])]
    cfg = load_config(overrides=overrides)
    result = {"benchmark": "rollout_throughput", "engine": args.engine, "model": args.model, "machine": machine(),
              "command": " ".join(["python"] + sys.argv), "num_seqs": args.num_seqs, "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "in_process_device": args.device, "service_device": service_device,
              "threads": torch.get_num_threads()}

    if not args.compare_hf_only:
        # the service first: its process owns its device while the in-process engine starts
        cluster = LocalCluster(os.path.join(work, "logs"), roots=[work], worker_secret="bench-worker-secret")
        try:
            env, dev = pin_gpu(service_device)
            # the same intra-op threads as this process, where the in-process engine runs
            env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
            proc = cluster.start("rollout", "services.rollout", "--device", dev, env=env)
            cluster.wait_healthy(proc)
            stub = rollout_pb2_grpc.RolloutServiceStub(cluster.channel(proc))
            stub.Setup(pb.SetupRequest(run_id="bench", config_yaml=config_to_yaml(cfg)), timeout=900)
            request = rpb.GenerateRequest(
                prompts=[rpb.Prompt(group_id=f"p-{i}", prompt_ids=ids_to_wire(p)) for i, p in enumerate(ps)],
                sampling=pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=args.max_tokens,
                                           seed=1), n=1)

            def via_service() -> int:
                return sum(s.response_ids.shape[0] for s in stub.Generate(request, timeout=900))
            result["service_tokens_per_s"] = tokens_per_s(via_service, args.repeats)
        finally:
            cluster.stop_all()

    engine = build_engine(cfg, device)

    def in_process() -> int:
        return sum(len(g.response_ids) for g in engine.generate(ps, sampling, 1))
    start = time.perf_counter()
    in_process()   # graph capture (built-in engine on GPU) happens here
    result["in_process_first_call_s"] = time.perf_counter() - start
    result["in_process_tokens_per_s"] = tokens_per_s(in_process, args.repeats)
    if "service_tokens_per_s" in result:
        result["service_over_in_process"] = result["service_tokens_per_s"] / result["in_process_tokens_per_s"]

    if args.compare_hf or args.compare_hf_only:
        del engine   # one model on the device at a time
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = AutoModelForCausalLM.from_pretrained(work, dtype=dtype).to(device).eval()
        batch = torch.tensor(ps, device=device)
        variants = {"hf_generate": {}}
        if args.hf_static:
            variants["hf_generate_static"] = {"cache_implementation": "static"}
        for name, extra in variants.items():
            def hf_generate(extra=extra) -> int:
                with torch.no_grad():
                    out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True,
                                         temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_tokens,
                                         min_new_tokens=args.max_tokens, pad_token_id=0, **extra)
                return int(out[:, batch.shape[1]:].numel())
            result[f"{name}_tokens_per_s"] = tokens_per_s(hf_generate, args.repeats)
            result[f"builtin_over_{name}"] = result["in_process_tokens_per_s"] / result[f"{name}_tokens_per_s"]
    if args.compare_builtin:
        builtin = build_engine(load_config(overrides=overrides + ["models.policy.engine=builtin"]), device)

        def builtin_run() -> int:
            return sum(len(g.response_ids) for g in builtin.generate(ps, sampling, 1))
        result["builtin_tokens_per_s"] = tokens_per_s(builtin_run, args.repeats)
        result["vllm_over_builtin"] = result["in_process_tokens_per_s"] / result["builtin_tokens_per_s"]
    write_result(args.out, result)


if __name__ == "__main__":
    main()
