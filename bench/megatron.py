"""The Megatron-core backend on one GPU, one command (about 7 minutes on one H200):

    python -m bench.megatron            # JSON to $OUT/megatron.json when OUT is set (and --out FILE)
    python -m bench.megatron --tiny     # CPU smoke test of the script itself

Parts (each a fresh trainer; a failing part is recorded, the others still run):
  dense    Qwen3-1.7B shape, 4 packed micro-batches of exactly 8192 tokens per step: tokens/s and MFU of
           backend=megatron against backend=fsdp (sdpa, and flex_attention) on the same seeded weights;
           bf16 logprob agreement megatron vs FSDP on one packed micro-batch, and each against FSDP in fp32.
  moe      an 8-layer Qwen3-30B-A3B-shaped MoE (128 experts, top 8), 2 packed micro-batches of 8192:
           FSDP groupgemm (transformers' grouped_mm) vs megatron groupgemm (GroupedExperts); two forwards of
           the same batch with moe_unpermute_dtype native (megatron's bf16 scatter-add) and fp32.
  short    SmolLM2-135M's shape (Llama) on a GRPO step of many short samples (256 samples of 8 per prompt, prompts
           30-70 tokens, responses 4-60, packed into rows of 8192): train-step seconds of FSDP (sdpa, flex_attention)
           and megatron, megatron once with megatron-core's own per-sequence THD rotary embedding and once with
           patch 3 (services/trainer/mcore/patches.py), and a profiled step of each backend (GPU busy vs idle).
  convert  a Qwen3-8B-shaped HF directory of random bf16 weights through `python -m services.trainer.convert`
           hf-to-mcore then mcore-to-hf: seconds, peak host memory above the process's start as a multiple of
           the model's bytes (memory it holds, RssAnon; and RSS with the safetensors pages it maps), whether
           CUDA was touched (GPU memory), and the round trip checked tensor by tensor (BLAKE2 digests).

MFU counts model FLOPs only (bench/trainer.py's formula): 6 x matmul parameters x tokens + causal
attention inside each sequence; for the MoE, the matmul parameters a token uses (top-k experts of each).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from bench.common import machine, write_result  # noqa: E402
from bench.gpu_trainer import SHAPES as GPU_SHAPES  # noqa: E402
from bench.trainer import LENGTHS, PEAKS, SHAPES, attempt, exact_bins, free, grpo_samples, model_flops, run_steps  # noqa: E402
from services.common.batches import make_micro_batch, split_into_micro_batches  # noqa: E402
from services.common.config import load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SmolLM2-135M-Instruct's architecture (the model of `make demo-real` and bench/gpu_grpo.py --shape smollm2)
SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True)
# a GRPO step of arithmetic-like samples: short prompts, short answers
SHORT = {"full": dict(prompt=(30, 70), median=20, sigma=0.6, response=(4, 60)),
         "tiny": dict(prompt=(4, 12), median=6, sigma=0.6, response=(2, 12))}


def config_dir(path: str, shape: dict, pack: int) -> str:
    spec = dict(shape)
    kind = spec.pop("model_type", "qwen3")
    AutoConfig.for_model(kind, max_position_embeddings=max(4096, pack), **spec).save_pretrained(path)
    return path


def backend(args, path: str, kind: str, *extra: str):
    from services.trainer.backends.fsdp import FSDPBackend
    from services.trainer.backends.megatron import MegatronBackend

    overrides = [f"models.policy.load={path}", f"models.policy_trainer.max_token_in_packing={args.pack}",
                 f"models.policy_trainer.dtype={args.dtype}", f"models.policy.max_prompt_tokens_length={args.pack // 8}",
                 f"models.policy.max_response_tokens_length={args.pack - args.pack // 8}", *extra]
    if kind == "megatron":
        return MegatronBackend(load_config(overrides=[*overrides, "models.policy_trainer.backend=megatron"]), args.device)
    return FSDPBackend(load_config(overrides=overrides), args.device)


def matmul_params(shape: dict, active: bool = True) -> int:
    """Parameters of the matmuls one token goes through (the LM head counted; the input embedding not)."""
    h, d, layers = shape["hidden_size"], shape["head_dim"], shape["num_hidden_layers"]
    attn = h * d * (2 * shape["num_attention_heads"] + 2 * shape["num_key_value_heads"])
    if shape.get("num_experts"):
        experts = shape["num_experts_per_tok"] if active else shape["num_experts"]
        mlp = experts * 3 * h * shape["moe_intermediate_size"] + h * shape["num_experts"]
    else:
        mlp = 3 * h * shape["intermediate_size"]
    return layers * (attn + mlp) + shape["vocab_size"] * h


def steps_row(args, b, mbs, shape: dict, peak) -> dict:
    flops = model_flops(shape, matmul_params(shape), [n for mb in mbs for n in mb.seq_lens])
    return run_steps(b, mbs, args.warmup, args.steps, flops, peak)


def lp_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict:
    d = (a - b).abs()[mask]
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())}


def part_dense(args, work: str, peak) -> dict:
    shape = SHAPES[args.dense_shape]
    path = config_dir(os.path.join(work, "dense"), shape, args.pack)
    bins = exact_bins(args.micro_batches, args.pack, LENGTHS[args.lengths], shape["vocab_size"], seed=1)
    total = sum(len(s.response_ids) for b in bins for s in b)
    mbs = [make_micro_batch(b, num_global_tokens=total, temperature=1.0) for b in bins]
    probe, mask = mbs[0], torch.ones(mbs[0].num_tokens, dtype=torch.bool)
    mask[torch.tensor([0, *probe.seq_lens]).cumsum(0)[:-1]] = False   # sequence starts have no logprob
    out, lps = {"shape": args.dense_shape, "micro_batches": len(mbs), "tokens_per_micro_batch": args.pack}, {}
    if args.device.type == "cuda":   # the fp32 reference of both bf16 forwards (FSDP, same seeded weights)
        def reference():
            b = backend(args, path, "fsdp", "models.policy_trainer.dtype=float32")
            lps["fsdp_fp32"] = b.compute_logprobs(probe)
            return {}
        attempt("dense fp32 reference", reference)
        free(args.device)
    for label, kind, extra in (("fsdp sdpa", "fsdp", ()), ("fsdp flex_attention", "fsdp",
                               ("models.policy_trainer.attn_implementation=flex_attention",)),
                               ("megatron", "megatron", ())):
        def one(label=label, kind=kind, extra=extra):
            b = backend(args, path, kind, *extra)
            if label != "fsdp flex_attention":
                lps[kind] = b.compute_logprobs(probe)
            return steps_row(args, b, mbs, shape, peak)
        out[label] = attempt(f"dense {label}", one)
        free(args.device)
    if "fsdp" in lps and "megatron" in lps:
        out["bf16_logprobs_megatron_vs_fsdp"] = lp_diff(lps["megatron"], lps["fsdp"], mask)
        for kind in ("fsdp", "megatron") if "fsdp_fp32" in lps else ():
            out[f"bf16_logprobs_{kind}_vs_fsdp_fp32"] = lp_diff(lps[kind], lps["fsdp_fp32"], mask)
    return out


def part_moe(args, work: str, peak) -> dict:
    shape = GPU_SHAPES[args.moe_shape]
    path = config_dir(os.path.join(work, "moe"), shape, args.pack)
    bins = exact_bins(args.moe_micro_batches, args.pack, LENGTHS[args.lengths], shape["vocab_size"], seed=2)
    total = sum(len(s.response_ids) for b in bins for s in b)
    mbs = [make_micro_batch(b, num_global_tokens=total, temperature=1.0) for b in bins]
    out = {"shape": args.moe_shape, "micro_batches": len(mbs), "tokens_per_micro_batch": args.pack,
           "active_matmul_params": matmul_params(shape), "all_matmul_params": matmul_params(shape, active=False)}
    flags = ("models.policy_trainer.groupgemm=True", "models.policy_trainer.meta_init=True")
    if "fsdp" in args.moe_backends:
        out["fsdp groupgemm"] = attempt("moe fsdp", lambda: steps_row(args, backend(args, path, "fsdp", *flags), mbs,
                                                                      shape, peak))
        free(args.device)

    def megatron():
        from services.trainer.mcore import patches

        b = backend(args, path, "megatron", *flags)
        row = steps_row(args, b, mbs, shape, peak)
        for name, dtype in (("native", None), ("fp32", torch.float32)):   # forward to forward, same batch
            patches.set_unpermute_dtype(dtype)
            one, two = b.compute_logprobs(mbs[0]), b.compute_logprobs(mbs[0])
            row[f"two_forwards_unpermute_{name}"] = {"max_abs_diff": float((one - two).abs().max()),
                                                     "bitwise_equal": bool(torch.equal(one, two))}
        return row
    if "megatron" in args.moe_backends:
        out["megatron groupgemm"] = attempt("moe megatron", megatron)
        free(args.device)
    return out


def part_short(args, work: str, peak) -> dict:
    """Many short sequences per packed row: where per-sequence work (not the matmuls) decides the step."""
    from megatron.core.models.common.embeddings import rope_utils

    from services.trainer.mcore import patches

    shape = dict(GPU_SHAPES["tiny"], model_type="llama") if args.tiny else SMOLLM2
    path = config_dir(os.path.join(work, "short"), shape, args.pack)
    seqs = grpo_samples(args.short_samples, 8, SHORT["tiny" if args.tiny else "full"], shape["vocab_size"], seed=3)
    mbs = split_into_micro_batches(seqs, packing=True, max_token_in_packing=args.pack, micro_batch_size=1,
                                   temperature=1.0)
    flops = model_flops(shape, matmul_params(shape), [n for mb in mbs for n in mb.seq_lens])
    out = {"shape": "smollm2-135m" if not args.tiny else "tiny", "samples": len(seqs), "micro_batches": len(mbs),
           "sequences_per_micro_batch": [len(mb.seq_lens) for mb in mbs],
           "tokens": sum(mb.num_tokens for mb in mbs)}
    patches.install_rope_patch()
    patched = rope_utils._apply_rotary_pos_emb_thd
    rows = (("fsdp sdpa", "fsdp", (), None), ("fsdp flex_attention", "fsdp",
            ("models.policy_trainer.attn_implementation=flex_attention",), None),
            ("megatron, megatron-core's rope loop", "megatron", (), patched.__wrapped__),
            ("megatron", "megatron", (), patched))
    for label, kind, extra, rope in rows:
        def one(kind=kind, extra=extra, rope=rope):
            b = backend(args, path, kind, *extra)
            if rope is not None:   # after the backend's own install_rope_patch
                rope_utils._apply_rotary_pos_emb_thd = rope
            try:
                return run_steps(b, mbs, args.warmup, args.steps, flops, peak, profiled=True)
            finally:
                rope_utils._apply_rotary_pos_emb_thd = patched
        out[label] = attempt(f"short {label}", one)
        free(args.device)
    return out


def _digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def _convert(direction: str, src: str, dst: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "protos")]))
    run = subprocess.run([sys.executable, "-m", "services.trainer.convert", direction, src, dst], env=env,
                         capture_output=True, text=True, timeout=900)
    if run.returncode:
        raise RuntimeError(run.stderr[-2000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def part_convert(args, work: str) -> dict:
    """Random bf16 weights written straight to safetensors (one tensor at a time), converted both ways;
    each directory is deleted when the next exists, so the disk holds at most two copies."""
    from services.trainer.convert.hf_io import HFReader, write_hf_weights
    from services.trainer.convert.shards import Dims, hf_shapes, model_items

    shape = GPU_SHAPES[args.convert_shape] if args.convert_shape in GPU_SHAPES else SHAPES[args.convert_shape]
    src = config_dir(os.path.join(work, "hf"), shape, 4096)
    dims = Dims.from_hf(AutoConfig.from_pretrained(src))
    specs = [(n, s, torch.bfloat16) for it in model_items(dims) for n, s in zip(it.hf, hf_shapes(it, dims))]
    digests: dict[str, str] = {}
    gen = torch.Generator(device=args.device).manual_seed(0)

    def tensors():
        for name, shp, dtype in specs:
            t = (torch.ones(shp, dtype=dtype) if len(shp) == 1 else
                 (torch.randn(shp, generator=gen, device=args.device, dtype=torch.float32) * 0.02).to(dtype).cpu())
            digests[name] = _digest(t)
            yield name, t

    t0 = time.perf_counter()
    write_hf_weights(src, specs, tensors())
    out = {"shape": args.convert_shape, "write_random_seconds": time.perf_counter() - t0}
    mcore, back = os.path.join(work, "mcore"), os.path.join(work, "back")
    out["hf_to_mcore"] = _convert("hf-to-mcore", src, mcore)
    shutil.rmtree(src)
    out["mcore_to_hf"] = _convert("mcore-to-hf", mcore, back)
    shutil.rmtree(mcore)
    with HFReader(back) as reader:
        names = reader.names()
        same = sorted(names) == sorted(digests) and all(_digest(reader.get(n)) == digests[n] for n in names)
    out["round_trip_bit_exact"] = same
    shutil.rmtree(back)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--parts", nargs="+", choices=["dense", "moe", "short", "convert"], default=["dense", "moe", "short", "convert"])
    add("--moe-backends", nargs="+", choices=["fsdp", "megatron"], default=["fsdp", "megatron"])
    add("--tiny", action="store_true", help="tiny shapes in float32 on CPU: checks the script, measures nothing")
    add("--pack", type=int, default=8192, help="tokens per packed micro-batch (models.policy_trainer.max_token_in_packing)")
    add("--micro-batches", type=int, default=4)
    add("--moe-micro-batches", type=int, default=2)
    add("--warmup", type=int, default=2)
    add("--steps", type=int, default=3)
    add("--dense-shape", default="qwen3-1.7b")
    add("--moe-shape", default="qwen3-moe-8l")
    add("--convert-shape", default="qwen3-8b")
    add("--short-samples", type=int, default=256, help="samples of the `short` part's GRPO step")
    add("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    add("--out", help="write the result JSON here too")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    args.dtype, args.lengths = "auto", "full"
    if args.tiny:
        args.dense_shape, args.moe_shape, args.convert_shape = "tiny", "tiny-moe", "tiny"
        args.pack, args.micro_batches, args.moe_micro_batches, args.warmup, args.steps = 256, 2, 2, 1, 1
        args.short_samples = 32
        args.dtype, args.lengths = "float32", "tiny"
    if args.device.type == "cuda":
        torch.cuda.set_device(args.device)
    card = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAKS if k in card), None)
    result = {"benchmark": "megatron", "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds"),
              "card": card, "peak_tflops": peak, "machine": machine(), "command": " ".join(["python -m bench.megatron",
                                                                                             *sys.argv[1:]]),
              "dtype": "bf16 compute, fp32 master weights" if args.dtype == "auto" and card != "cpu" else "float32",
              "seconds": {}}
    try:
        import megatron.core
        result["megatron_core"] = megatron.core.__version__
    except ImportError as exc:
        result["megatron_core"] = f"missing: {exc}"
    with tempfile.TemporaryDirectory(prefix="rlgrid-mcore-bench-") as work:
        for part in args.parts:
            t0 = time.perf_counter()
            fn = {"dense": lambda: part_dense(args, work, peak), "moe": lambda: part_moe(args, work, peak),
                  "short": lambda: part_short(args, work, peak), "convert": lambda: part_convert(args, work)}[part]
            result[part] = attempt(part, fn)
            result["seconds"][part] = round(time.perf_counter() - t0, 1)
            free(args.device)
    out = args.out or (os.path.join(os.environ["OUT"], "megatron.json") if os.environ.get("OUT") else None)
    write_result(out, result)
    summary(result)


def summary(r: dict) -> None:
    f = lambda v, spec: "-" if v is None else format(v, spec)   # noqa: E731
    print(f"\n== megatron backend benchmark on {r['card']} (megatron-core {r.get('megatron_core')}, "
          f"peak {r['peak_tflops']} TFLOPS, {r['dtype']}) ==")
    for part in ("dense", "moe", "short"):
        p = r.get(part, {})
        if "error" in p:
            print(f"{part:<7} ERROR {p['error'][:200]}")
            continue
        for label, row in p.items():
            if isinstance(row, dict) and ("median_step_seconds" in row or "error" in row):
                prof = row.get("profile", {})
                print(f"{part:<7} {label:<36}", f"ERROR {row['error'][:150]}" if "error" in row else
                      f"{row['useful_tokens_per_s']:>9.0f} tok/s  step {row['median_step_seconds']:.3f} s  "
                      f"MFU {f(row['mfu'], '.1%')}  mem {f(row.get('peak_memory_gib'), '.1f')} GiB  "
                      f"step-1 loss {row['step1_loss']:.5f}" +
                      (f"  GPU idle {prof['gpu_idle_frac']:.0%}" if "gpu_idle_frac" in prof else ""))
                for k, v in row.items():
                    if k.startswith("two_forwards"):
                        print(f"{part:<7} {k:<32} max |diff| {v['max_abs_diff']:.2e}  bitwise equal {v['bitwise_equal']}")
        for k, v in p.items():
            if k.startswith("bf16_logprobs"):
                print(f"{part:<7} {k:<38} max |diff| {v['max_abs_diff']:.3e}  mean {v['mean_abs_diff']:.3e}")
    c = r.get("convert", {})
    if "error" in c:
        print(f"convert ERROR {c['error'][:200]}")
    elif c:
        for key in ("hf_to_mcore", "mcore_to_hf"):
            s = c[key]
            print(f"convert {key:<12} {s['bytes'] / 2**30:6.2f} GiB  {s['seconds']:7.1f} s  peak above start: "
                  f"{s['peak_extra_anon_x_model']:.3f}x model held, {s['peak_extra_rss_x_model']:.3f}x with mapped "
                  f"file pages  CUDA touched: {s['cuda_initialized']}")
        print(f"convert round trip bit-exact: {c['round_trip_bit_exact']}")
    print("seconds per part:", r["seconds"])


if __name__ == "__main__":
    main()
