"""Pipeline parallelism of the megatron backend on two GPUs, one command (a few minutes on two H200s):

    torchrun --nproc-per-node 2 -m bench.megatron_pp          # JSON to $OUT/megatron_pp.json when OUT is set
    torchrun --nproc-per-node 2 -m bench.megatron_pp --tiny   # CPU (gloo) smoke test of the script itself

(PP needs two ranks, and NCCL two GPUs: two ranks cannot share one.) On the same seeded weights
(Qwen3-1.7B shape, 28 layers: 14 per stage) and the same packed micro-batches, in bf16 compute over fp32
parameters, PP=2 against PP=1 (the two ranks then data-parallel), each driven as the trainer service
drives its ranks (services/trainer/ranks.py, metrics merged over ranks):
  agreement  logprobs of one packed micro-batch before training; loss and grad_norm of `--steps` steps
             of `--micro-batches` micro-batches; the weights the weight sync sends after them (max |diff|)
  bubble     seconds per optimizer step for m = 2, 4, 8, 16 micro-batches of `--pack` tokens: at PP=2
             a step takes about (m + 1) micro-batch times (the pipe fills and drains), so tokens/s rises
             with m towards the no-bubble rate; at PP=1 each rank runs m/2 micro-batches through all layers
  memory     peak GPU memory per rank (rank 0 and the maximum) during the steps
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.common import machine, write_result  # noqa: E402
from bench.megatron import config_dir  # noqa: E402
from bench.trainer import LENGTHS, SHAPES, attempt, exact_bins, free, sync  # noqa: E402
from services.common.batches import make_micro_batch  # noqa: E402
from services.common.config import load_config  # noqa: E402


def micro_batches(args, vocab: int, count: int, seed: int):
    bins = exact_bins(count, args.pack, LENGTHS[args.lengths], vocab, seed=seed)
    total = sum(len(s.response_ids) for b in bins for s in b)
    return [make_micro_batch(b, num_global_tokens=total, temperature=1.0) for b in bins]


def build(args, path: str, pp: int):
    from services.trainer.backends.megatron import MegatronBackend

    return MegatronBackend(load_config(overrides=[
        f"models.policy.load={path}", "models.policy_trainer.backend=megatron",
        f"models.policy_trainer.pipeline_model_parallel_size={pp}", f"models.policy_trainer.dtype={args.dtype}",
        f"models.policy_trainer.max_token_in_packing={args.pack}", "models.policy_trainer.optimizer.lr=1e-5",
        f"models.policy.max_prompt_tokens_length={args.pack // 8}",
        f"models.policy.max_response_tokens_length={args.pack - args.pack // 8}"]), args.device)


def layout(args, ranks, path: str, pp: int, reference: dict) -> dict:
    """One layout's rows; `reference` holds PP=1's logprobs and weights (rank 0) for PP=2 to compare."""
    ranks.backend = None
    free(args.device)
    ranks.backend = build(args, path, pp)
    vocab = ranks.backend.vocab_size
    probe = micro_batches(args, vocab, 1, seed=99)[0]
    out: dict = {}
    lp = ranks._logprobs(probe)
    steps = []
    for seed in range(args.steps):
        m = ranks._train(micro_batches(args, vocab, args.micro_batches, seed=seed) if ranks.rank == 0 else None)
        steps.append({k: m[k] for k in ("loss", "grad_norm", "micro_batches", "seconds")})
    out["steps"] = steps
    weights = {n: t.cpu() for n, t in ranks.backend.full_params()}   # every rank iterates (stages send to rank 0)
    if ranks.rank != 0:
        weights = {}
    if pp == 1:
        reference.update(lp=lp, weights=weights, steps=steps)
    elif ranks.rank == 0:
        mask = torch.ones(probe.num_tokens, dtype=torch.bool)
        mask[torch.tensor([0, *probe.seq_lens]).cumsum(0)[:-1]] = False
        out["logprobs_vs_pp1_max_abs_diff"] = float((lp - reference["lp"]).abs()[mask].max())
        out["loss_vs_pp1_rel_diff"] = [abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12)
                                       for a, b in zip(steps, reference["steps"])]
        out["grad_norm_vs_pp1_rel_diff"] = [abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"]
                                            for a, b in zip(steps, reference["steps"])]
        same = list(weights) == list(reference["weights"])
        out["synced_names_and_order_as_pp1"] = same
        if same:
            out["synced_weights_vs_pp1_max_abs_diff"] = max(float((weights[n].float() - reference["weights"][n].float()).abs().max())
                                                            for n in weights)
    del weights
    rows = {}
    for m in args.bubble:
        mbs = micro_batches(args, vocab, m, seed=100 + m) if ranks.rank == 0 else None
        ranks._train(mbs)   # warm-up
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)
        sync(args.device)
        t0 = time.perf_counter()
        for _ in range(args.timed):
            ranks._train(mbs)
        sync(args.device)
        seconds = (time.perf_counter() - t0) / args.timed
        peak = torch.tensor([torch.cuda.max_memory_allocated(args.device) / 2**30 if args.device.type == "cuda"
                             else 0.0])
        rank0 = float(peak)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        rows[str(m)] = {"step_seconds": round(seconds, 4), "tokens_per_s": round(m * args.pack / seconds),
                        "peak_gib_rank0": round(rank0, 2), "peak_gib_max": round(float(peak), 2),
                        "bubble_fraction_expected": round((pp - 1) / (m + pp - 1), 3)}
    out["bubble"] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--tiny", action="store_true", help="CPU smoke test: tiny model, short rows, gloo")
    add("--shape", choices=sorted(SHAPES), default="qwen3-1.7b")
    add("--pack", type=int, default=4096, help="tokens per packed micro-batch")
    add("--micro-batches", type=int, default=4, help="micro-batches per step of the agreement check")
    add("--steps", type=int, default=2)
    add("--bubble", type=int, nargs="*", default=[2, 4, 8, 16], help="micro-batches per step to time")
    add("--timed", type=int, default=2, help="timed steps per row")
    add("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.pack, args.bubble, args.timed = "tiny", 128, [2, 4], 1
    args.lengths = "tiny" if args.tiny else "full"
    from services.trainer.ranks import TrainerRanks

    args.device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
                   else torch.device("cpu"))
    if args.device.type == "cuda":
        torch.cuda.set_device(args.device)
    args.dtype = "auto" if args.device.type == "cuda" else "float32"
    ranks = TrainerRanks(args.device)
    if ranks.world != 2:
        raise SystemExit("run it with torchrun --nproc-per-node 2 (PP=2 on two ranks against PP=1 on the same two)")
    result = {"machine": machine(), "shape": args.shape, "pack": args.pack, "dtype": args.dtype,
              "micro_batches": args.micro_batches, "steps": args.steps}
    reference: dict = {}
    with tempfile.TemporaryDirectory(prefix="rlgrid-pp-bench-") as work:
        box = [os.path.join(work, "model")]   # rank 0's directory, for both ranks (one host)
        dist.broadcast_object_list(box, src=0)
        path = box[0]
        if ranks.rank == 0:
            config_dir(path, SHAPES[args.shape], args.pack)
        dist.barrier()
        for pp in (1, 2):
            result[f"pp{pp}"] = attempt(f"pp={pp}", lambda pp=pp: layout(args, ranks, path, pp, reference))
        dist.barrier()
    if ranks.rank == 0:
        out = args.out or (os.path.join(os.environ["OUT"], "megatron_pp.json") if os.environ.get("OUT") else None)
        write_result(out, result)
        summary(result)
    dist.destroy_process_group()


def summary(r: dict) -> None:
    print(f"\n== megatron backend, PP=2 vs PP=1 on two ranks ({r['shape']}, {r['pack']}-token micro-batches, "
          f"{r['dtype']}) ==")
    two = r.get("pp2", {})
    for key in ("logprobs_vs_pp1_max_abs_diff", "loss_vs_pp1_rel_diff", "grad_norm_vs_pp1_rel_diff",
                "synced_names_and_order_as_pp1", "synced_weights_vs_pp1_max_abs_diff", "error"):
        if key in two:
            print(f"{key:<38} {json.dumps(two[key])[:120]}")
    print(f"{'layout':<7} {'m':>3} {'s/step':>8} {'tok/s':>9} {'peak GiB r0/max':>16} {'bubble (expected)':>18}")
    for pp in (1, 2):
        for m, row in r.get(f"pp{pp}", {}).get("bubble", {}).items():
            print(f"PP={pp:<4} {m:>3} {row['step_seconds']:>8.3f} {row['tokens_per_s']:>9} "
                  f"{row['peak_gib_rank0']:>7.1f}/{row['peak_gib_max']:<8.1f} {row['bubble_fraction_expected']:>18}")


if __name__ == "__main__":
    main()
