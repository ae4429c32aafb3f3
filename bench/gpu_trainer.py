"""The trainer's at-scale features on N GPUs, in-process (FSDPBackend on every rank, no gRPC), under torchrun:

    torchrun --nproc-per-node 4 bench/gpu_trainer.py features --out r.json     # SP, GroupGEMM, ref offload
    python bench/gpu_trainer.py write-weights --shape qwen3-8b --dir /tmp/m8b    # random bf16 safetensors
    torchrun --nproc-per-node 4 bench/gpu_trainer.py load --dir /tmp/m8b [--meta-init]   # host peak RSS
    torchrun --nproc-per-node 2 bench/gpu_trainer.py resume-save --dir /tmp/ck
    torchrun --nproc-per-node 4 bench/gpu_trainer.py resume-load --dir /tmp/ck  # DCP reshards 2 -> 4

Each command prints one JSON line per result (rank 0) and appends it to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine  # noqa: E402
from services.common.batches import TrainSequence, make_micro_batch  # noqa: E402
from services.common.config import load_config  # noqa: E402
from services.trainer.backends.fsdp import FSDPBackend  # noqa: E402
from services.trainer.ranks import balance  # noqa: E402

SHAPES = {
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=True),
    "qwen3-1.7b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=True),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False),
    "tiny": dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "tiny-moe": dict(model_type="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=128,
                     moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    # Qwen3-30B-A3B's layer (128 experts, top 8, hidden 2048) at 8 layers
    "qwen3-moe-8l": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                         moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, num_hidden_layers=8,
                         num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True,
                         tie_word_embeddings=False),
}


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def emit(args, result: dict) -> None:
    if rank0():
        line = json.dumps({**result, "world_size": dist.get_world_size() if dist.is_initialized() else 1})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


def model_dir(shape: str, path: str) -> str:
    """A config-only directory (seeded random init) for `shape`."""
    from transformers import AutoConfig
    if rank0() and not os.path.isfile(os.path.join(path, "config.json")):
        spec = dict(SHAPES[shape])
        AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=32768, **spec).save_pretrained(path)
    if dist.is_initialized():
        dist.barrier()
    return path


CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if CUDA else torch.device("cpu")
TINY = not CUDA   # a CPU smoke run (gloo) uses tiny shapes and short sequences


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def backend(path: str, *extra: str) -> FSDPBackend:
    cfg = load_config(overrides=[f"models.policy.load={path}", "models.policy_trainer.optimizer.lr=1e-5",
                                 "models.policy.max_prompt_tokens_length=1024",
                                 "models.policy.max_response_tokens_length=3072",
                                 "models.policy_trainer.max_token_in_packing=8192", *extra])
    return FSDPBackend(cfg, DEVICE)


def step(seed: int, n_micro: int, vocab: int, tokens: int = 8192) -> list:
    """`n_micro` packed micro-batches of ~`tokens` tokens: sequences of 200-3000 tokens, seeded."""
    g = torch.Generator().manual_seed(seed)
    vocab, tokens, scale = (512, tokens // 64, 64) if TINY else (vocab, tokens, 1)
    mbs, seqs_all = [], []
    for _ in range(n_micro):
        seqs, used = [], 0
        while True:
            length = int(torch.randint(200 // scale + 2, 3000 // scale, (), generator=g))
            if used + length > tokens:
                break
            p = int(torch.randint(1, 200 // scale, (), generator=g))
            ids = torch.randint(0, vocab, (length,), generator=g).tolist()
            seqs.append(TrainSequence(ids[:p], ids[p:], (-torch.rand(length - p, generator=g) - 1).tolist(),
                                      float(torch.randn((), generator=g)), 0))
            used += length
        seqs_all.append(seqs)
    total = sum(len(s.response_ids) for seqs in seqs_all for s in seqs)
    for seqs in seqs_all:
        mbs.append(make_micro_batch(seqs, num_global_tokens=total, temperature=1.0))
    return mbs


def timed_step(b: FSDPBackend, mbs: list) -> dict:
    """One optimizer step over `mbs` on all ranks, dealt like the trainer service deals them
    (ranks of one SP group share micro-batches); loss terms summed over ranks as it sums them."""
    sp = b.cfg.models.policy_trainer.ulysses_sequence_parallel_size
    mine = balance(mbs, dist.get_world_size(), sp)[dist.get_rank()]
    sync()
    t0 = time.perf_counter()
    m = b.train_step(mine)
    sync()
    seconds = time.perf_counter() - t0
    summed = torch.tensor([m["loss"], m["kl"], m["tokens"]], dtype=torch.float64, device=DEVICE)
    dist.all_reduce(summed)
    return {**m, "loss": float(summed[0]), "kl": float(summed[1]), "tokens": float(summed[2]),
            "wall_seconds": seconds}


def free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def memory() -> dict:
    if not CUDA:
        return {}
    return {"peak_gib": torch.cuda.max_memory_allocated(DEVICE) / 2**30,
            "resident_gib": torch.cuda.memory_allocated(DEVICE) / 2**30}


def features(args) -> None:
    """Ulysses SP vs SP=1, GroupGEMM vs the expert loop, reference offload vs resident: logprobs, the same
    step's metrics, step time and GPU memory, side by side on the same ranks."""
    world = dist.get_world_size()
    dense = model_dir("tiny" if TINY else "qwen3-0.6b", os.path.join(args.dir, "dense"))
    moe = model_dir("tiny-moe" if TINY else "qwen3-moe-8l", os.path.join(args.dir, "moe"))
    probe = step(1, 1, 151936, tokens=6000)[0]
    mbs = step(2, world, 151936)

    def run(path: str, *extra: str) -> tuple[torch.Tensor, dict, dict]:
        if CUDA:
            torch.cuda.reset_peak_memory_stats(DEVICE)
        b = backend(path, *extra)
        lp = b.compute_logprobs(probe)
        timed_step(b, mbs)                     # warm-up step (also moves the weights)
        m = timed_step(b, mbs)
        mem = memory()
        del b   # the last reference: FSDP modules hold cycles, so free() collects them before the next run
        free()
        return lp, m, mem

    def compare(name: str, a, b, label_a: str, label_b: str) -> None:
        (lpa, ma, mema), (lpb, mb, memb) = a, b
        emit(args, {"check": name, "logprob_max_abs_diff": float((lpa - lpb).abs().max()),
                    **{f"{label}_{k}": m[k] for label, m in ((label_a, ma), (label_b, mb))
                       for k in ("loss", "kl", "grad_norm", "wall_seconds", "tokens")},
                    **{f"{label}_{k}": v for label, mem in ((label_a, mema), (label_b, memb)) for k, v in mem.items()}})

    checks, sp, flex = set(args.checks), ("models.policy_trainer.ulysses_sequence_parallel_size=2",), \
        ("models.policy_trainer.attn_implementation=flex_attention",)
    if world >= 2 and "sp" in checks:
        compare("ulysses_sp2_dense", run(dense), run(dense, *sp), "sp1", "sp2")
        compare("ulysses_sp2_moe", run(moe, "models.policy_trainer.groupgemm=True"),
                run(moe, "models.policy_trainer.groupgemm=True", *sp), "sp1", "sp2")
    if "groupgemm" in checks:
        compare("groupgemm_moe", run(moe), run(moe, "models.policy_trainer.groupgemm=True"), "loop", "grouped")
    if "flex" in checks:   # flex_attention vs sdpa: the same packed rows, dealt over the ranks
        compare("flex_dense", run(dense), run(dense, *flex), "sdpa", "flex")
    if world >= 2 and "sp_flex" in checks:
        compare("ulysses_sp2_flex_dense", run(dense), run(dense, *sp, *flex), "sp1", "sp2flex")
    if "ref_offload" in checks:
        kl = ("models.policy_trainer.kl_coef=0.05",)
        compare("ref_offload_dense", run(dense, *kl), run(dense, *kl, "models.policy_trainer.ref_offload=True"),
                "resident", "offload")


def write_weights(args) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    spec = dict(SHAPES[args.shape])
    config = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=32768, **spec)
    t0 = time.perf_counter()
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.dir, max_shard_size="4GB")
    params = sum(p.numel() for p in model.parameters())
    emit(args, {"check": "write_weights", "shape": args.shape, "params": params, "seconds": time.perf_counter() - t0})


def load(args) -> None:
    """Host peak RSS per rank while building the trainer (policy only) from safetensors."""
    t0 = time.perf_counter()
    b = backend(args.dir, f"models.policy_trainer.meta_init={args.meta_init}")
    sync()
    seconds = time.perf_counter() - t0
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], device=DEVICE)  # KiB -> GiB
    all_rss = [torch.zeros_like(rss) for _ in range(dist.get_world_size())]
    dist.all_gather(all_rss, rss)
    params = sum(p.numel() for p in b.model.parameters())
    emit(args, {"check": "load", "meta_init": args.meta_init, "params": params,
                "full_fp32_gib": params * 4 / 2**30, "host_peak_rss_gib_per_rank": [float(x) for x in all_rss],
                **memory(), "init_seconds": seconds})


def resume_save(args) -> None:
    path = model_dir("tiny" if TINY else "qwen3-0.6b", os.path.join(args.dir, "model"))
    b = backend(path, "models.policy_trainer.optimizer.lr_warmup_iters=4")
    timed_step(b, step(3, 4, 151936, tokens=4096))
    b.save_checkpoint(os.path.join(args.dir, "ckpt"), {"episode": 1})
    probe = step(4, 1, 151936, tokens=4096)[0]
    lp = b.compute_logprobs(probe)
    nxt = timed_step(b, step(5, 4, 151936, tokens=4096))
    if rank0():
        torch.save({"logprobs": lp, "next": nxt}, os.path.join(args.dir, "expected.pt"))
    emit(args, {"check": "resume_save", "next_step": {k: nxt[k] for k in ("loss", "grad_norm", "lr")}})


def resume_load(args) -> None:
    b = backend(os.path.join(args.dir, "model"), "models.policy_trainer.optimizer.lr_warmup_iters=4")
    meta = b.load_checkpoint(os.path.join(args.dir, "ckpt"))
    expected = torch.load(os.path.join(args.dir, "expected.pt"), weights_only=False)
    lp = b.compute_logprobs(step(4, 1, 151936, tokens=4096)[0])
    nxt = timed_step(b, step(5, 4, 151936, tokens=4096))
    emit(args, {"check": "resume_load", "extra": meta, "step": b.step,
                "logprob_max_abs_diff": float((lp - expected["logprobs"]).abs().max()),
                **{f"next_{k}": nxt[k] for k in ("loss", "grad_norm", "lr")},
                **{f"saved_next_{k}": expected["next"][k] for k in ("loss", "grad_norm", "lr")}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["features", "write-weights", "load", "resume-save", "resume-load"])
    parser.add_argument("--dir", default="/tmp/rlgrid-gpu-trainer")
    parser.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    parser.add_argument("--meta-init", action="store_true")
    parser.add_argument("--checks", nargs="+", default=["sp", "groupgemm", "ref_offload"],
                        choices=["sp", "groupgemm", "flex", "sp_flex", "ref_offload"], help="features: which to compare")
    parser.add_argument("--out")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    if args.command != "write-weights":
        if CUDA:
            torch.cuda.set_device(DEVICE)
        dist.init_process_group("nccl" if CUDA else "gloo")
    if rank0() and args.command in ("features", "write-weights"):
        emit(args, {"check": "machine", **machine(), "command": " ".join(sys.argv)})
    {"features": features, "write-weights": write_weights, "load": load, "resume-save": resume_save,
     "resume-load": resume_load}[args.command](args)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
