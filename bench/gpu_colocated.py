"""One GPU, trainer and rollout service colocated (issue 13), measured side by side in one run:

  colocated  a trainer service and a rollout service on the same GPU, driven like the coordinator's loop
             (rollout, agreement, train, weight sync; a 0.36B Qwen3-shaped model, 64 samples x 256 tokens),
             one row per variant: the weights over gloo through host memory or through CUDA IPC, and with
             or without memory release (the replica's Sleep(level) after rollout and WakeUp before the
             sync, the trainer's Offload after the sync and Onload before training). Per row: median
             step, rollout, agreement, train, sync and memory-call seconds; sync bytes and its send /
             receive / commit split; bf16 agreement; the GPU's peak memory per phase (nvidia-smi) and
             what the services report; with release, the trainer's logprobs before Offload and after
             Onload (must be identical).
  mfu        bench/trainer.py's MFU rows for the Qwen3-1.7B shape (flex_attention + torch_compile, packed
             8k, no recompute): LM head unfused / fused with the logprobs x AdamW foreach / fused.

    bash bench/gpu_colocated.sh                                  # one H200, about 5 minutes (wheels, PYTHONPATH, then:)
    python bench/gpu_colocated.py                                # the same, in a prepared environment
    python bench/gpu_colocated.py --engine vllm --parts colocated  # bench/gpu_vllm_colocated.sh (vLLM installed)
    python bench/gpu_colocated.py --cpu                          # CPU smoke run of the same code (tiny shapes)

Prints a short table last; writes JSON to $OUT/gpu_colocated[_vllm].json (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from transformers import Qwen3Config  # noqa: E402

from bench.common import machine, pin_gpu  # noqa: E402
from rlgrid.v1 import common_pb2 as pb  # noqa: E402
from rlgrid.v1 import rollout_pb2 as rpb  # noqa: E402
from services.common import batches  # noqa: E402
from services.common.config import config_to_yaml, load_config  # noqa: E402
from services.common.weight_sync import Rendezvous  # noqa: E402
from services.coordinator.advantages import group_normalized_advantages  # noqa: E402
from services.coordinator.clients import RolloutPool, TrainerClient  # noqa: E402
from services.coordinator.local import ROOT, LocalCluster  # noqa: E402
from services.coordinator.steps import logprob_agreement, optimizer_steps, to_sequences  # noqa: E402
from services.coordinator.sync import WeightSync  # noqa: E402

SHAPES = {
    # the issue's 0.36B model: 0.72 GB of bf16 weights
    "qwen3-0.36b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=13,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
}
SECRET = "bench-colocated-secret"   # this script steers the services itself, as a coordinator would
VARIANTS = ["gloo", "ipc", "gloo+release", "ipc+release"]


class GpuMemory:
    """The GPU's used memory (nvidia-smi, every process on it), sampled in a thread; the peak per phase."""

    def __init__(self, uuid: str | None):
        self.uuid, self.samples, self.phases = uuid, [], []
        self._stop = threading.Event()
        if uuid:
            threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "-i", self.uuid, "--query-gpu=memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
                self.samples.append((time.perf_counter(), float(out.stdout.strip().splitlines()[0])))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            self._stop.wait(0.02)

    @contextmanager
    def phase(self, name: str, times: dict):
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            times[name] = times.get(name, 0.0) + end - start
            self.phases.append((name, start, end))

    def peaks_gib(self, since: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, start, end in self.phases:
            if start < since:
                continue
            used = [mib for t, mib in self.samples if start <= t <= end]
            if used:
                out[name] = max(out.get(name, 0.0), max(used) / 1024)
        return out

    def stop(self) -> None:
        self._stop.set()


def median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def run_variant(name: str, ctx: dict, args) -> dict:
    """Warm-up and timed steps of one variant, on the services already set up."""
    cfg, trainer, pool, mem = ctx["cfg"], ctx["trainer"], ctx["pool"], ctx["mem"]
    rollout = pool.replicas[0]
    release, gpu = "release" in name, args.device.startswith("cuda")
    sync = WeightSync(Rendezvous("127.0.0.1"), trainer, pool, bucket_mb=cfg.runtime_args.weight_sync_bucket_mb,
                      ipc=name.startswith("ipc"))
    version = ctx["version"]
    sync.sync(version)   # the group is built (and its first transfer made) outside the timed steps
    rng = random.Random(7)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.samples // args.n)]
    response = prompts[1][:16]
    probe = batches.make_micro_batch([batches.TrainSequence(prompts[0], response, [-1.0] * len(response), 1.0, 0)],
                                     num_global_tokens=len(response), temperature=1.0)
    steps, reports, roundtrip, probe_before = [], {}, None, None
    started = time.perf_counter()
    if release and gpu:
        trainer.call("Offload", pb.Empty(), "memory")   # the state the first rollout runs in
    for k in range(args.warmup + args.steps):
        times: dict[str, float] = {}
        sampling = pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=args.max_tokens, seed=100 + k)
        if release and k:   # the KV cache wakes only before generating (as placement.Colocated does)
            with mem.phase("wake_kv", times):
                reports["wake_kv"] = rollout.call("WakeUp", rpb.WakeUpRequest(tags=["kv_cache"]), "memory")
        with mem.phase("rollout", times):
            samples = pool.generate(prompts, sampling, args.n, tag=f"{name}-{k}")
        assert all(s.version == version for s in samples), "a sample of another version than the one synced"

        if release:
            with mem.phase("sleep", times):
                reports["sleep"] = rollout.call("Sleep", rpb.SleepRequest(level=args.sleep_level), "memory")
            if gpu:
                with mem.phase("onload", times):
                    reports["onload"] = trainer.call("Onload", pb.Empty(), "memory")
                if probe_before is not None and roundtrip is None:   # Offload, Onload: bit-identical logprobs
                    roundtrip = float((trainer.logprobs(probe) - probe_before).abs().max())
        with mem.phase("agreement", times):
            agreement = logprob_agreement(trainer, samples, k=4, threshold=float("inf"), temperature=1.0,
                                          trainer_version=version)
        rewards = torch.rand(len(samples), generator=torch.Generator().manual_seed(k))
        advantages = group_normalized_advantages(rewards, args.n)
        with mem.phase("train", times):
            train = [trainer.train(mbs) for mbs in optimizer_steps(to_sequences(samples, advantages), cfg, k)]
        version += len(train)
        if release:
            with mem.phase("wake", times):   # the weights only: the sync lands in them beside the trainer's state
                reports["wake"] = rollout.call("WakeUp", rpb.WakeUpRequest(tags=["weights"]), "memory")
        with mem.phase("sync", times):
            synced = sync.sync(version)
        if release and gpu:
            if k == 0:
                probe_before = trainer.logprobs(probe)
            with mem.phase("offload", times):
                reports["offload"] = trainer.call("Offload", pb.Empty(), "memory")
        row = {**times, "step": sum(times.values()), "agreement_max_abs_diff": agreement,
               "sync_bytes": synced["sync/bytes"], "send": synced["sync/send_seconds"],
               "receive": synced["sync/receive_seconds"], "commit": synced["sync/commit_seconds"],
               "train_peak_gib": train[0].get("memory/peak_gib"), "tokens": sum(len(s.response_ids) for s in samples)}
        steps.append(row)
        print(f"[{name}] step {k}: " + " ".join(f"{key} {v:.3f}" for key, v in row.items()
                                                if isinstance(v, float) and key not in ("sync_bytes",)), flush=True)
    if release:
        if gpu:
            trainer.call("Onload", pb.Empty(), "memory")
        rollout.call("WakeUp", rpb.WakeUpRequest(), "memory")
    ctx["version"] = version
    timed = steps[args.warmup:] or steps
    keys = ["step", "rollout", "agreement", "train", "sync", "sleep", "wake", "wake_kv", "onload", "offload", "send",
            "receive", "commit"]
    return {"variant": name, "transport": sync.kind, "steps": steps,
            "median_seconds": {k: median(timed, k) for k in keys if median(timed, k) is not None},
            "sync_bytes": timed[-1]["sync_bytes"], "max_agreement_diff": max(r["agreement_max_abs_diff"] for r in steps),
            "gpu_peak_gib_by_phase": mem.peaks_gib(started),
            "service_reports": {k: {f.name: v for f, v in r.ListFields()} for k, r in reports.items()},
            "offload_roundtrip_logprob_max_abs_diff": roundtrip,
            "sleep_level": args.sleep_level if release else 0}


def part_colocated(args, work: str) -> dict:
    shape = SHAPES[args.shape]
    model = os.path.join(work, "model")
    config = Qwen3Config(**shape, max_position_embeddings=4096, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    if args.engine == "vllm":   # vLLM loads weights from disk: random bf16 ones
        from transformers import AutoModelForCausalLM
        with torch.device(args.device):
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(model)
        torch.cuda.empty_cache()
    else:
        config.save_pretrained(model)
    gpu = args.device.startswith("cuda")
    overrides = [f"models.policy.load={model}", f"models.policy.engine={args.engine}",
                 "models.policy.dtype=auto", "models.policy_trainer.dtype=auto",
                 f"models.policy.max_prompt_tokens_length={args.prompt_len}",
                 f"models.policy.max_response_tokens_length={args.max_tokens}",
                 f"runtime_args.sample_per_episode={args.samples}", f"runtime_args.train_global_batch_size={args.samples}",
                 f"runtime_args.num_inference_per_prompt={args.n}", "models.policy_trainer.optimizer.lr=1e-5",
                 "runtime_args.rpc_timeout_s.weight_sync=120", *(["models.policy_trainer.offload=True"] if gpu else []),
                 *([f"models.policy.gpu_memory_utilization={args.gpu_memory_utilization}",
                    "models.policy.enable_sleep_mode=True"] if args.engine == "vllm" else [])]
    cfg = load_config(overrides=overrides)
    cluster = LocalCluster(os.path.join(work, "logs"), roots=[work], worker_secret=SECRET)
    out: dict = {"shape": args.shape, "engine": args.engine, "samples": args.samples, "max_tokens": args.max_tokens,
                 "prompt_len": args.prompt_len, "warmup_steps": args.warmup, "timed_steps": args.steps, "rows": []}
    mem = None
    try:
        env, dev = pin_gpu(args.device)   # both services see the same one GPU
        trainer_proc = cluster.start("trainer", "services.trainer", "--device", dev, env=env)
        rollout_proc = cluster.start("rollout", "services.rollout", "--device", dev, env=env)
        for proc in (trainer_proc, rollout_proc):
            cluster.wait_healthy(proc, timeout=300)
        limits = dict(max_message_mb=256, timeouts=cfg.runtime_args.rpc_timeout_s)
        trainer = TrainerClient(trainer_proc.address, **limits, secret=SECRET)
        pool = RolloutPool([rollout_proc.address], **limits, retries=0, max_sequences=args.samples,
                           secrets={rollout_proc.address: SECRET})
        setup = pb.SetupRequest(run_id="bench", config_yaml=config_to_yaml(cfg))
        t0 = time.perf_counter()
        trainer.call("Setup", setup, "setup")
        pool.call_all("Setup", setup, "setup")
        out["setup_seconds"] = time.perf_counter() - t0
        uuids = list(trainer.call("GetInfo", pb.Empty()).gpu_uuids)
        out["gpu"] = uuids
        mem = GpuMemory(uuids[0] if uuids else None)
        ctx = {"cfg": cfg, "trainer": trainer, "pool": pool, "mem": mem, "version": 0}
        for name in args.variants:
            t0 = time.perf_counter()
            try:
                row = run_variant(name, ctx, args)
            except Exception as exc:  # noqa: BLE001 - one variant's failure is recorded, the others still run
                traceback.print_exc()
                row = {"variant": name, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            row["seconds"] = time.perf_counter() - t0
            out["rows"].append(row)
            print(f"[{name}] {row['seconds']:.1f} s", row.get("error", ""), flush=True)
    finally:
        if mem:
            mem.stop()
        for proc in list(cluster.procs):
            if proc.popen.poll() is not None:
                print(f"--- {proc.name} exited {proc.popen.returncode}:\n{proc.log_tail(60)}")
        cluster.stop_all()
    return out


def part_mfu(args, work: str) -> dict:
    """bench/trainer.py's MFU rows, in a process of their own (the GPU to itself)."""
    path = os.path.join(work, "trainer.json")
    cmd = [sys.executable, "-m", "bench.trainer", "--parts", "mfu", "--head", "unfused", "fused", "--adamw", "foreach",
           "fused", "--gc", "0", "--out", path]
    cmd += (["--tiny", "--attn", "sdpa", "--compile", "0"] if args.cpu else
            ["--model", "qwen3-1.7b", "--attn", "flex_attention", "--compile", "1", "--warmup", "2", "--steps", "2"])
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (done.stdout + done.stderr)[-4000:]
    if done.returncode or not os.path.exists(path):
        return {"error": f"bench.trainer exited {done.returncode}", "log_tail": tail}
    with open(path) as f:
        result = json.load(f)
    print("\n".join(line for line in done.stdout.splitlines() if line.startswith(("mfu", "=="))), flush=True)
    return {"command": " ".join(cmd[1:]), **result["mfu"], "card": result["card"], "peak_tflops": result["peak_tflops"]}


def summary(r: dict) -> None:
    f = lambda v, spec: "-" if v is None else format(v, spec)   # noqa: E731
    c = r.get("colocated", {})
    if c:
        print(f"\n== colocated on one GPU: {c.get('engine')} engine, {c.get('shape')}, {c.get('samples')} samples x "
              f"{c.get('max_tokens')} tokens (medians over {c.get('timed_steps')} steps) ==")
        print(f"{'variant':<14}{'sync via':<10}{'step':>7}{'rollout':>9}{'train':>7}{'sync':>9}{'memory':>8}"
              f"{'sync GB':>9}{'agree':>8}  peak GiB rollout/train/sync")
        for row in c.get("rows", []):
            if "error" in row:
                print(f"{row['variant']:<14}ERROR {row['error'][:150]}")
                continue
            m, p = row["median_seconds"], row["gpu_peak_gib_by_phase"]
            memory = sum(m.get(k, 0.0) for k in ("sleep", "wake", "onload", "offload"))
            print(f"{row['variant']:<14}{row['transport']:<10}{m['step']:>7.2f}{m['rollout']:>9.2f}{m['train']:>7.2f}"
                  f"{m['sync'] * 1e3:>7.1f}ms{memory:>8.2f}{row['sync_bytes'] / 1e9:>9.2f}"
                  f"{row['max_agreement_diff']:>8.3f}  {f(p.get('rollout'), '.1f')}/{f(p.get('train'), '.1f')}/"
                  f"{f(p.get('sync'), '.1f')}")
    m = r.get("mfu", {})
    if m:
        print(f"\n== trainer MFU, {m.get('card', '?')} ({m.get('command', '')}) ==")
        if "error" in m:
            print("ERROR", m["error"], m.get("log_tail", "")[-1500:])
        for row in m.get("rows", []):
            print(f"{row['attn']:<48}", f"ERROR {row['error'][:150]}" if "error" in row else
                  f"{row['useful_tokens_per_s']:>9.0f} tok/s  MFU {f(row['mfu'], '.1%')}  "
                  f"step {row['median_step_seconds']:.3f} s  peak {f(row.get('peak_memory_gib'), '.1f')} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--parts", nargs="+", choices=["colocated", "mfu"], default=["colocated", "mfu"])
    add("--engine", choices=["builtin", "vllm"], default="builtin")
    add("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    add("--shape", choices=sorted(SHAPES), default="qwen3-0.36b")
    add("--samples", type=int, default=64)
    add("--n", type=int, default=8, help="samples per prompt")
    add("--prompt-len", type=int, default=64)
    add("--max-tokens", type=int, default=256)
    add("--warmup", type=int, default=1)
    add("--steps", type=int, default=3)
    add("--sleep-level", type=int, choices=[1, 2], default=2, help="the replica's Sleep level in +release rows")
    add("--gpu-memory-utilization", type=float, default=0.3, help="vLLM's share of the GPU (the trainer needs the rest)")
    add("--device", default="cuda:0")
    add("--cpu", action="store_true", help="smoke run on the CPU: tiny shapes, one step, no cuda_ipc, no Offload")
    add("--out", help="the result JSON (default: $OUT/gpu_colocated[_vllm].json when OUT is set)")
    args = parser.parse_args()
    if args.cpu:
        args.device, args.shape, args.samples, args.n, args.prompt_len, args.max_tokens = "cpu", "tiny", 8, 4, 8, 8
        args.warmup, args.steps = 0, 1
    out_dir = os.environ.get("OUT")
    args.out = args.out or (os.path.join(out_dir, f"gpu_colocated{'_vllm' if args.engine == 'vllm' else ''}.json")
                            if out_dir else None)
    result = {"benchmark": "gpu_colocated", "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds"),
              "machine": machine(), "command": " ".join(["python", *sys.argv]), "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="rlgrid-colocated-") as work:
        for part in args.parts:
            t0 = time.perf_counter()
            result[part] = part_colocated(args, work) if part == "colocated" else part_mfu(args, work)
            result["seconds"][part] = time.perf_counter() - t0
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print("seconds per part:", {k: round(v, 1) for k, v in result["seconds"].items()})
    summary(result)


if __name__ == "__main__":
    main()
