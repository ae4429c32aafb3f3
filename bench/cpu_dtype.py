"""bf16 against float32 on this CPU: the built-in engine on SmolLM2-135M-Instruct (`make demo-real`'s
model), the held-out evaluation's shape (48 prompts, one answer each, 32 tokens) greedy and sampled,
and a training episode's rollout (4 prompts x 8 samples). Says whether the CPU multiplies bf16
natively (AVX512-BF16 or AMX); without, torch emulates bf16 matmuls.

    python bench/cpu_dtype.py [--model output/smollm2-135m-instruct] [--out bench/results/DATE_cpu2_dtype.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine, write_result  # noqa: E402
from services.common.import_gguf import import_gguf, shipped_smollm2  # noqa: E402
from services.common.models import native_bf16_cpu  # noqa: E402
from services.coordinator.local import ROOT  # noqa: E402
from services.rollout.engine import Sampling  # noqa: E402
from services.rollout.engines.builtin import BuiltinEngine  # noqa: E402


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(ROOT, "output", "smollm2-135m-instruct"))
    parser.add_argument("--out")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.model, "model.safetensors")):
        import_gguf(shipped_smollm2(), args.model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (60,), generator=g).tolist() for _ in range(48)]
    cases = [("eval_greedy_48x1", Sampling(temperature=0, max_tokens=32, seed=5), 1, prompts),
             ("eval_sampled_48x1", Sampling(temperature=0.7, max_tokens=32, seed=5), 1, prompts),
             ("episode_4x8", Sampling(temperature=0.7, max_tokens=32, seed=5), 8, prompts[:4])]
    seconds: dict[str, dict[str, float]] = {}
    for dtype in ("bfloat16", "float32"):
        engine = BuiltinEngine(args.model, dtype=getattr(torch, dtype), device=torch.device("cpu"), max_num_seqs=256)
        list(engine.generate(prompts[:2], cases[1][1], 1))   # warm-up
        for name, sampling, n, ps in cases:
            start = time.perf_counter()
            tokens = sum(len(out.response_ids) for out in engine.generate(ps, sampling, n))
            seconds.setdefault(name, {})[dtype] = round(time.perf_counter() - start, 2)
            seconds[name][f"{dtype}_tokens"] = tokens
        del engine
    result = {"benchmark": "cpu_dtype", "machine": {**machine(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
                                                    "native_bf16": native_bf16_cpu(),
                                                    "load_average_1_5_15": os.getloadavg()},
              "command": "python bench/cpu_dtype.py", "seconds": seconds,
              "bf16_over_fp32": {k: round(v["bfloat16"] / v["float32"], 2) for k, v in seconds.items()}}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
