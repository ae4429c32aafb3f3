"""Trainer benchmark on one GPU through the real trainer code path (FSDPBackend.train_step: forward,
chunked fp32 logprobs + entropy, GRPO loss, backward, grad clip, AdamW), random init from a config-only dir:

  mfu      tokens/s and MFU of a Qwen3-shaped model on packed micro-batches of exactly --pack tokens,
           gradient checkpointing off and on (--gc), per models.policy_trainer.attn_implementation (--attn),
           torch_compile (--compile), LM head fused with the logprobs or not (--head) and AdamW fused or
           foreach (--adamw), a fresh trainer each with the same seeded weights; each variant's packed
           logprobs vs each sequence alone (sdpa);
  packing  packed (best-fit-decreasing bins of --pack tokens) vs padded (runtime_args.train_micro_batch_size
           = --padded-mbs) on the SAME GSM8K-like samples, fresh identical weights per mode: useful tokens/s,
           ratio, step-1 loss of both;
  moe      one Qwen3-30B-A3B-shaped sparse MoE block: transformers' per-expert loop ("eager") vs
           "grouped_mm", forward+backward time, max output/grad differences.

    python -m bench.trainer --out bench/results/DATE_h100_trainer.json      # one H100: ~5 min
    python -m bench.trainer --tiny                                          # CPU smoke test

Model FLOPs per step (MFU counts only these; the gradient-checkpointing recompute and the loss's
recomputed fp32 logprob chunks are overhead, not model FLOPs):
    6 * N * tokens + 12 * layers * heads * head_dim * sum_over_sequences L * (L + 1) / 2
N = parameters except the input embedding, plus vocab * hidden for the lm_head matmul (tied or not);
the attention term counts only the causal (q, k) pairs inside each sequence, never pad or
cross-sequence pairs, so packed and padded runs of the same samples do the same useful work.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import random
import statistics
import sys
import tempfile
import time
import traceback

import torch
import transformers
from transformers import Qwen3Config, Qwen3MoeConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine, write_result  # noqa: E402
from services.common.batches import TrainSequence, make_micro_batch, split_into_micro_batches  # noqa: E402
from services.common.config import load_config  # noqa: E402
from services.trainer.backends.fsdp import FSDPBackend  # noqa: E402
from services.trainer.optim import build_optimizer  # noqa: E402

SHAPES = {
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
}
# GSM8K-like lengths: prompt uniform in [lo, hi]; response lognormal(ln median, sigma) clipped to [lo, hi]
LENGTHS = {"full": dict(prompt=(60, 200), median=300, sigma=0.9, response=(20, 3000)),
           "tiny": dict(prompt=(4, 16), median=24, sigma=0.9, response=(2, 200))}
MOE = {"full": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, tokens=8192),
       "tiny": dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, tokens=256)}
# dense bf16 TFLOPS by device-name substring, first match wins (H200: the H100 SXM's tensor cores)
PEAKS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def attempt(label: str, fn) -> dict:
    """Runs one variant; a failure (OOM, missing kernel, API change) is recorded, not fatal."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:   # noqa: BLE001
        out = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        traceback.print_exc()   # into the run's log: a GPU-only failure is diagnosed from it
    print(f"[{label}] {time.perf_counter() - t0:.1f} s", out.get("error", ""), flush=True)
    return out


# ---- samples ----------------------------------------------------------------------------------
def draw(rng: random.Random, lengths: dict) -> tuple[int, int]:
    lo, hi = lengths["response"]
    r = int(rng.lognormvariate(math.log(lengths["median"]), lengths["sigma"]))
    return rng.randint(*lengths["prompt"]), min(max(r, lo), hi)


def sample(rng: random.Random, vocab: int, prompt: int | list[int], r: int) -> TrainSequence:
    prompt = prompt if isinstance(prompt, list) else [rng.randrange(vocab) for _ in range(prompt)]
    # old logprobs of a near-uniform random-init policy; GRPO-normalised advantages of +-1
    return TrainSequence(prompt, [rng.randrange(vocab) for _ in range(r)], [-math.log(vocab)] * r,
                         rng.choice([-1.0, 1.0]), 0)


def grpo_samples(n: int, group: int, lengths: dict, vocab: int, seed: int) -> list[TrainSequence]:
    """n samples, `group` responses per prompt, in group order (as the coordinator sends them)."""
    rng, out = random.Random(seed), []
    for i in range(n):
        p, r = draw(rng, lengths)
        out.append(sample(rng, vocab, out[-1].prompt_ids if i % group else p, r))
    return out


def exact_bins(count: int, capacity: int, lengths: dict, vocab: int, seed: int) -> list[list[TrainSequence]]:
    """`count` bins of exactly `capacity` tokens from the same distribution (static shapes, so compiled
    kernels compile once); a bin's last sequence is cut to fit, a too-short remainder merged into it."""
    rng, bins = random.Random(seed), []
    for _ in range(count):
        seqs, left = [], capacity
        while left:
            p, r = draw(rng, lengths)
            n = left if left - min(p + r, left) < lengths["prompt"][0] else p + r
            p = min(p, n // 2)
            seqs.append(sample(rng, vocab, p, n - p))
            left -= n
        bins.append(seqs)
    return bins


# ---- FLOPs and steps --------------------------------------------------------------------------
def matmul_params(model: torch.nn.Module) -> int:
    names = dict(model.named_parameters())
    n = sum(p.numel() for k, p in names.items() if "embed_tokens" not in k)
    if "lm_head.weight" not in names:   # tied: the lm_head matmul still runs
        n += model.config.vocab_size * model.config.hidden_size
    return n


def model_flops(shape: dict, n_params: int, seq_lens: list[int]) -> float:
    attn = 12 * shape["num_hidden_layers"] * shape["num_attention_heads"] * shape["head_dim"]
    return 6.0 * n_params * sum(seq_lens) + attn * sum(L * (L + 1) / 2 for L in seq_lens)


def build(args, model_dir: str, *extra: str, attn: str = "sdpa") -> FSDPBackend:
    overrides = [f"models.policy.load={model_dir}", f"models.policy_trainer.dtype={args.dtype}",
                 f"models.policy_trainer.attn_implementation={attn}",
                 f"models.policy_trainer.max_token_in_packing={args.pack}",
                 f"models.policy.max_prompt_tokens_length={args.lengths['prompt'][1]}",
                 f"models.policy.max_response_tokens_length={args.lengths['response'][1]}", *extra]
    return FSDPBackend(load_config(overrides=overrides), args.device)


# GPU kernels by what they do, matched on their names (first match wins; the rest is "other")
KERNEL_KINDS = [("optimizer (AdamW)", ("adam", "multi_tensor")), ("nccl / copies / casts", ("nccl", "memcpy", "memset",
                "copy", "cast", "convert", "fill")), ("attention", ("flex", "attention", "fmha", "flash", "sdpa")),
                ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "sm90")),
                ("reductions", ("reduce", "softmax", "logsumexp", "norm")), ("fused elementwise (triton)", ("triton",)),
                ("elementwise", ("elementwise", "vectorized", "unrolled"))]


def profile_step(backend: FSDPBackend, mbs) -> dict:
    """One more train step under torch.profiler: the GPU's kernel time by kind, against the step's wall
    time (the rest is the GPU idle: launches, host work, waits)."""
    from torch.profiler import ProfilerActivity, profile
    dev = backend.device
    if dev.type != "cuda":
        return {"error": "GPU only"}
    sync(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        backend.train_step(mbs)
        sync(dev)
        wall = time.perf_counter() - t0
    kinds: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        name = e.key.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e6
        top.append((us / 1e6, e.key[:120]))
    busy = sum(kinds.values())
    return {"wall_seconds": wall, "gpu_busy_seconds": busy, "gpu_idle_frac": 1 - busy / wall,
            "seconds_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"seconds": s, "kernel": k} for s, k in sorted(top, reverse=True)[:15]]}


def run_steps(backend: FSDPBackend, mbs, warmup: int, steps: int, flops: float, peak: float | None,
              profiled: bool = False) -> dict:
    """warmup + steps train steps on the same micro-batches; step 1's loss is the starting weights'.
    `profiled`: then one more step under the profiler (`profile_step`)."""
    dev, times, first = backend.device, [], None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup + steps):
        sync(dev)
        t0 = time.perf_counter()
        m = backend.train_step(mbs)
        sync(dev)
        times.append(time.perf_counter() - t0)
        first = first or {"step1_loss": m["loss"], "step1_grad_norm": m["grad_norm"]}
    med = statistics.median(times[warmup:] or times)
    useful = sum(sum(mb.seq_lens) for mb in mbs)
    out = {**first, "micro_batches": len(mbs), "tokens_processed": sum(mb.num_tokens for mb in mbs),
           "useful_tokens": useful, "warmup_seconds": times[:warmup], "step_seconds": times[warmup:],
           "median_step_seconds": med, "useful_tokens_per_s": useful / med, "model_tflops_per_s": flops / med / 1e12,
           "mfu": flops / med / (peak * 1e12) if peak else None}
    if dev.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if profiled:
        out["profile"] = attempt("profile", lambda: profile_step(backend, mbs))
    return out


# ---- parts ------------------------------------------------------------------------------------
def variant(attn: str, compiled: int, head: str = "fused", adamw: str = "fused") -> str:
    """Row label; the LM head and AdamW are named only where they differ from the trainer's defaults."""
    extra = ("" if head == "fused" else " head=unfused") + ("" if adamw == "fused" else f" adamw={adamw}")
    return attn + ("+compile" if compiled else "") + extra


def set_kernels(backend: FSDPBackend, head: str, adamw: str) -> None:
    """The LM head fused with the logprobs or not, and AdamW's implementation, on a fresh trainer."""
    backend.fused_head = backend.fused_head and head == "fused"
    if adamw != "fused":
        backend.optimizer, backend.scheduler = build_optimizer(backend.model.parameters(), backend.cfg, adamw)


def packed_logprobs(backend: FSDPBackend, groups: list[list[TrainSequence]]) -> torch.Tensor:
    """Logprobs of each group run as one packed micro-batch, grad on as in a train step (no kernel
    compiles twice)."""
    backend.model.train()
    return torch.cat([backend._logprobs(backend.model, make_micro_batch(g, num_global_tokens=1, temperature=1.0),
                                        with_entropy=False)[0].detach().float() for g in groups])


def mfu_rows(args, model_dir: str, gc_on: bool, shape: dict, bins, peak: float | None, check: dict,
             reference: torch.Tensor) -> list[dict]:
    """`check` gets each variant's packed logprobs vs `reference` (gc off only, before any update)."""
    n_global = sum(len(s.response_ids) for b in bins for s in b)
    mbs = [make_micro_batch(b, num_global_tokens=n_global, temperature=1.0) for b in bins]
    rows = []
    kinds = [(a, c, h, o) for a in args.attn for c in args.compile for h in args.head for o in args.adamw]
    for attn, comp, head, adamw in kinds:   # a fresh trainer each, same weights
        def one(attn=attn, comp=comp, head=head, adamw=adamw):
            free(args.device)
            backend = build(args, model_dir, f"models.policy_trainer.gradient_checkpointing={gc_on}",
                            f"models.policy_trainer.torch_compile={bool(comp)}", attn=attn)
            set_kernels(backend, head, adamw)
            n_params = matmul_params(backend.model)
            if not gc_on:
                diff = (packed_logprobs(backend, [bins[0]]) - reference).abs()
                check[variant(attn, comp, head, adamw)] = {"max_abs_diff": float(diff.max()),
                                                           "mean_abs_diff": float(diff.mean())}
            flops = model_flops(shape, n_params, [n for mb in mbs for n in mb.seq_lens])
            res = {"matmul_params": n_params, "model_flops_per_step": flops,
                   **run_steps(backend, mbs, args.warmup, args.steps, flops, peak, profiled=args.profile)}
            del backend
            return res
        rows.append({"gradient_checkpointing": gc_on, "attn": variant(attn, comp, head, adamw),
                     "lm_head": head, "adamw": adamw,
                     **attempt(f"mfu gc={gc_on} {variant(attn, comp, head, adamw)}", one)})
    return rows


def part_mfu(args, model_dir: str, shape: dict, peak: float | None) -> dict:
    bins = exact_bins(args.mfu_micro_batches, args.pack, args.lengths, shape["vocab_size"], seed=1)
    lens = [s.length for b in bins for s in b]
    out = {"micro_batches_per_step": len(bins), "tokens_per_micro_batch": args.pack, "sequences_per_step": len(lens),
           "mean_sequence_tokens": statistics.mean(lens), "lengths": args.lengths,
           "attn_logprobs": {"reference": "each sequence alone, sdpa"}, "rows": []}
    backend = build(args, model_dir)   # the same seeded weights as every variant's trainer
    reference = packed_logprobs(backend, [[s] for s in bins[0]])
    del backend
    for gc_on in sorted({bool(g) for g in args.gc}):
        out["rows"] += mfu_rows(args, model_dir, gc_on, shape, bins, peak, out["attn_logprobs"], reference)
    return out


def part_packing(args, model_dir: str, shape: dict, peak: float | None) -> dict:
    seqs = grpo_samples(args.samples, 8, args.lengths, shape["vocab_size"], seed=2)
    lens = [s.length for s in seqs]
    out = {"samples": len(seqs), "group_size": 8, "lengths": args.lengths, "max_token_in_packing": args.pack,
           "gradient_checkpointing": bool(args.packing_gc), "train_micro_batch_size_padded": args.padded_mbs,
           "mean_sample_tokens": statistics.mean(lens), "max_sample_tokens": max(lens),
           "useful_tokens_per_step": sum(lens)}
    for mode, packing in (("packed", True), ("padded", False)):
        free(args.device)
        mbs = split_into_micro_batches(seqs, packing=packing, max_token_in_packing=args.pack,
                                       micro_batch_size=args.padded_mbs, temperature=1.0)
        if not packing:   # padded to each micro-batch's longest sequence, as FSDPBackend does
            out["padded_tokens_per_step"] = sum(len(mb.seq_lens) * max(mb.seq_lens) for mb in mbs)

        def one(packing=packing, mbs=mbs):   # a fresh trainer per kernel: the same seeded initial weights
            res = {}
            kinds = [(a, c) for a in args.attn for c in args.compile] if packing else [("sdpa", 0)]
            for attn, comp in kinds:   # padded: sdpa over each padded micro-batch, eager
                free(args.device)
                backend = build(args, model_dir, f"models.policy_trainer.packing={packing}",
                                f"runtime_args.train_micro_batch_size={args.padded_mbs}",
                                f"models.policy_trainer.gradient_checkpointing={bool(args.packing_gc)}",
                                f"models.policy_trainer.torch_compile={bool(comp)}", attn=attn)
                flops = model_flops(shape, matmul_params(backend.model), lens)
                res[variant(attn, comp)] = attempt(f"{mode} {variant(attn, comp)}", lambda b=backend, f=flops: run_steps(
                    b, mbs, args.packing_warmup, args.packing_steps, f, peak))
                del backend
            return res
        out[mode] = attempt(mode, one)
    q = out["padded"].get("sdpa", {})
    for attn, p in out["packed"].items() if "error" not in out["packed"] else []:
        if "useful_tokens_per_s" in p and "useful_tokens_per_s" in q:   # packed (this kernel) vs padded sdpa
            out.setdefault("speedup_packed_over_padded", {})[attn] = p["useful_tokens_per_s"] / q["useful_tokens_per_s"]
            out.setdefault("step1_loss_abs_diff", {})[attn] = abs(p["step1_loss"] - q["step1_loss"])
            out.setdefault("step1_grad_norm_rel_diff", {})[attn] = abs(p["step1_grad_norm"] / q["step1_grad_norm"] - 1)
    return out


def part_moe(args) -> dict:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    m = dict(MOE["tiny" if args.tiny else "full"])
    tokens, dev = m.pop("tokens"), args.device
    dtype = torch.bfloat16 if dev.type == "cuda" and not args.tiny else torch.float32
    config = Qwen3MoeConfig(**m, norm_topk_prob=True)
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config)
    for p in block.parameters():   # the experts' weights start as torch.empty
        torch.nn.init.normal_(p, std=0.02)
    block.to(dev, dtype)
    x = torch.randn(1, tokens, m["hidden_size"], device=dev, dtype=dtype)
    dy = torch.randn_like(x)
    flops = 6 * tokens * m["num_experts_per_tok"] * 3 * m["hidden_size"] * m["moe_intermediate_size"]
    out = {**m, "tokens": tokens, "dtype": str(dtype)[6:], "expert_tflops_per_iter": flops / 1e12}
    ref = []
    for impl in ("eager", "grouped_mm"):
        def one(impl=impl):
            config._experts_implementation = impl   # a standalone block: read at every forward
            times = []
            for _ in range(args.moe_warmup + args.moe_iters):
                xi = x.detach().requires_grad_()
                block.zero_grad(set_to_none=True)
                sync(dev)
                t0 = time.perf_counter()
                block(xi).backward(dy)
                sync(dev)
                times.append(time.perf_counter() - t0)
            with torch.no_grad():
                res = [block(x), xi.grad] + [p.grad for p in block.parameters()]
            med = statistics.median(times[args.moe_warmup:])
            row = {"median_fwd_bwd_ms": med * 1e3, "expert_tflops_per_s": flops / med / 1e12}
            if ref:   # max |a - b| / max |eager| of the output, d input and the worst parameter grad
                rel = [float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                       for a, b in zip(res, ref)]
                row.update(output_max_rel_diff=rel[0], dx_max_rel_diff=rel[1], dparam_max_rel_diff=max(rel[2:]))
            ref[:] = ref or res
            return row
        out[impl] = attempt(f"moe {impl}", one)
    e, g = out["eager"].get("median_fwd_bwd_ms"), out["grouped_mm"].get("median_fwd_bwd_ms")
    if e and g:
        out["speedup_grouped_over_eager"] = e / g
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--tiny", action="store_true", help="tiny shapes, float32, 1+1 steps: a CPU smoke test")
    add("--model", choices=sorted(SHAPES), default="qwen3-1.7b")
    add("--parts", nargs="+", choices=["mfu", "packing", "moe"], default=["mfu", "packing", "moe"])
    add("--attn", nargs="+", default=["sdpa", "flex_attention"], help="models.policy_trainer.attn_implementation "
        "values of the mfu rows and the packed rows (padded runs sdpa)")
    add("--compile", nargs="+", type=int, choices=[0, 1], default=[0], help="models.policy_trainer.torch_compile "
        "values of the mfu and packed rows (1: each decoder layer compiled)")
    add("--head", nargs="+", choices=["fused", "unfused"], default=["fused"], help="the mfu rows' LM head: fused "
        "with the logprobs (the trainer's default) or the full logits first")
    add("--adamw", nargs="+", choices=["fused", "foreach"], default=["fused"], help="the mfu rows' AdamW "
        "implementation (fused: the trainer's default)")
    add("--gc", nargs="+", type=int, choices=[0, 1], default=[0, 1], help="gradient checkpointing of the mfu rows")
    add("--pack", type=int, default=8192, help="models.policy_trainer.max_token_in_packing")
    add("--mfu-micro-batches", type=int, default=4, help="packed micro-batches per MFU step")
    add("--profile", action="store_true", help="the mfu rows: one more step under torch.profiler, the GPU's "
        "kernel time by kind (matmul, attention, optimizer, copies, ...) and its idle fraction")
    add("--warmup", type=int, default=2)
    add("--steps", type=int, default=3)
    add("--samples", type=int, default=256, help="samples per step in the packed/padded part")
    add("--padded-mbs", type=int, default=4, help="runtime_args.train_micro_batch_size when padded")
    add("--packing-gc", type=int, choices=[0, 1], default=1, help="gradient checkpointing in the packed/padded "
        "part, both modes (padded at 4 x 3200 tokens without it does not fit an 80 GB H100 with the 1.7B model)")
    add("--packing-warmup", type=int, default=1)
    add("--packing-steps", type=int, default=2)
    add("--moe-warmup", type=int, default=3)
    add("--moe-iters", type=int, default=10)
    add("--peak-tflops", type=float, help="dense bf16 peak of the card (default: from its name)")
    add("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    add("--out", help="write the result JSON here too")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    if args.tiny:
        args.model, args.pack, args.samples, args.mfu_micro_batches = "tiny", 256, 32, 2
        args.warmup = args.steps = args.packing_warmup = args.packing_steps = args.moe_warmup = 1
        args.moe_iters = 2
    args.lengths = LENGTHS["tiny" if args.tiny else "full"]
    args.dtype = "float32" if args.tiny else "auto"   # auto: bf16 compute, fp32 master weights on GPU
    card = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    if args.device.type == "cuda":
        torch.cuda.set_device(args.device)
    peak = args.peak_tflops or next((v for k, v in PEAKS if k in card), None)   # CPU: None, no MFU
    shape = SHAPES[args.model]
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {"benchmark": "trainer", "date_utc": now.isoformat("T", "seconds"), "card": card,
              "machine": machine(), "transformers": transformers.__version__,
              "command": " ".join(["python", "-m", "bench.trainer"] if __package__ else ["python"] + sys.argv[:1]) + " "
              + " ".join(sys.argv[1:]), "model": args.model, "shape": shape,
              "dtype": "bf16 compute, fp32 master weights" if args.dtype == "auto" and card != "cpu" else "float32",
              "peak_tflops": peak, "flops_formula": __doc__.split("Model FLOPs per step")[1].strip(), "seconds": {}}
    with tempfile.TemporaryDirectory() as model_dir:
        Qwen3Config(**shape, max_position_embeddings=max(4096, args.pack)).save_pretrained(model_dir)
        for part in args.parts:
            t0 = time.perf_counter()
            result[part] = (part_mfu(args, model_dir, shape, peak) if part == "mfu" else
                            part_packing(args, model_dir, shape, peak) if part == "packing" else part_moe(args))
            result["seconds"][part] = time.perf_counter() - t0
            free(args.device)
    write_result(args.out, result)
    summary(result)


def summary(r: dict) -> None:
    f = lambda v, spec: "-" if v is None else format(v, spec)   # noqa: E731
    err = lambda row: f"ERROR {row['error'][:150]}"   # noqa: E731
    print(f"\n== trainer benchmark: {r['model']} on {r['card']} (peak {r['peak_tflops']} TFLOPS) ==")
    for row in r.get("mfu", {}).get("rows", []):
        print(f"mfu  gc={'on ' if row['gradient_checkpointing'] else 'off'} {row['attn']:<40}", err(row) if "error" in
              row else f"{row['useful_tokens_per_s']:>9.0f} tok/s {row['model_tflops_per_s']:6.1f} TFLOPS  "
              f"MFU {f(row['mfu'], '.1%')}  mem {f(row.get('peak_memory_gib'), '.1f')} GiB")
    for row in r.get("mfu", {}).get("rows", []):
        prof = row.get("profile")
        if prof and "error" not in prof:
            kinds = ", ".join(f"{k} {v / prof['wall_seconds']:.0%}" for k, v in prof["seconds_by_kind"].items())
            print(f"mfu  profile {row['attn']}: step {prof['wall_seconds']:.3f} s, GPU idle "
                  f"{prof['gpu_idle_frac']:.0%}; {kinds}")
    for attn, row in r.get("mfu", {}).get("attn_logprobs", {}).items():
        if attn != "reference":
            print(f"mfu  logprobs {attn} packed vs alone:", err(row) if "error" in row else
                  f"max |diff| {row['max_abs_diff']:.2e}, mean {row['mean_abs_diff']:.2e}")
    if "packing" in r:
        p = r["packing"]
        for mode in ("packed", "padded"):
            for attn, row in (p[mode].items() if "error" not in p[mode] else [("-", p[mode])]):
                print(f"pack {mode:<6} {attn:<24}", err(row) if "error" in row else
                      f"{row['useful_tokens_per_s']:>9.0f} useful tok/s  {row['micro_batches']} micro-batches  "
                      f"step-1 loss {row['step1_loss']:.6f}  MFU {f(row['mfu'], '.1%')}")
        for attn, x in p.get("speedup_packed_over_padded", {}).items():
            print(f"pack packed ({attn}) / padded (sdpa) speedup {x:.2f}x  |step-1 loss diff| "
                  f"{p['step1_loss_abs_diff'][attn]:.2e}")
        print(f"pack padded/useful tokens {f(p.get('padded_tokens_per_step', 0) / p['useful_tokens_per_step'], '.2f')}")
    if "moe" in r:
        m = r["moe"]
        for impl in ("eager", "grouped_mm"):
            row = m[impl]
            print(f"moe  {impl:<10}", err(row) if "error" in row else
                  f"{row['median_fwd_bwd_ms']:8.2f} ms fwd+bwd  {row['expert_tflops_per_s']:6.1f} TFLOPS" +
                  (f"  max rel diff out {row['output_max_rel_diff']:.1e} dx {row['dx_max_rel_diff']:.1e} "
                   f"dW {row['dparam_max_rel_diff']:.1e}" if "dx_max_rel_diff" in row else ""))
        print(f"moe  grouped_mm speedup {f(m.get('speedup_grouped_over_eager'), '.2f')}x")
    print("seconds per part:", {k: round(v, 1) for k, v in r["seconds"].items()})


if __name__ == "__main__":
    main()
