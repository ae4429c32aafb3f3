"""Weight sync benchmark: a Qwen3-shaped model (random init) synced from the trainer service to a
rollout service through rlgrid's weight-sync protocol (plan, bucketed broadcast into staging,
commit), against a raw torch.distributed.broadcast of the same bytes between the same devices,
measured in the same run. Ratio = raw seconds / ours (1.0 = as fast as the raw broadcast).

    python bench/weight_sync.py --model qwen3-1.7b --trainer-device cuda:0 --rollout-device cuda:1
    python bench/weight_sync.py --model tiny --trainer-device cpu --rollout-device cpu   # smoke test
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Qwen3Config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine, write_result  # noqa: E402
from rlgrid.v1 import common_pb2 as pb  # noqa: E402
from rlgrid.v1 import rollout_pb2 as rpb  # noqa: E402
from services.common.config import config_to_yaml, load_config  # noqa: E402
from services.common.tensors import ids_to_wire  # noqa: E402
from services.common.weight_sync import Rendezvous  # noqa: E402
from services.coordinator.clients import RolloutPool, TrainerClient, decode_sample  # noqa: E402
from services.coordinator.local import LocalCluster, free_port  # noqa: E402
from services.coordinator.steps import logprob_agreement  # noqa: E402
from services.coordinator.sync import WeightSync  # noqa: E402

SHAPES = {
    # Qwen3-1.7B's shape: 1.72B parameters with tied embeddings (~1.5B without them)
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
}


def raw_broadcast(rank: int, port: int, devices: list[str], nbytes: int, iters: int, out) -> None:
    device = torch.device(devices[rank])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(devices),
                            timeout=datetime.timedelta(seconds=300),
                            device_id=device if device.type == "cuda" else None)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for i in range(iters + 2):   # two warm-ups
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dist.broadcast(buf, src=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    if rank == 1:
        out.put(times)
    dist.destroy_process_group()


def measure_raw(devices: list[str], nbytes: int, iters: int) -> list[float]:
    """A raw broadcast of `nbytes` from devices[0] to all the others, one process per device."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=raw_broadcast, args=(r, port, devices, nbytes, iters, out)) for r in range(len(devices))]
    for p in procs:
        p.start()
    times = out.get(timeout=600)
    for p in procs:
        p.join(60)
    return times


def measure_ours(model_dir: str, args) -> dict:
    secret = "bench-worker-secret"   # this script steers the services itself, as a coordinator would
    cluster = LocalCluster(os.path.join(model_dir, "logs"), roots=[model_dir], worker_secret=secret)
    try:
        trainer = cluster.start("trainer", "services.trainer", "--device", args.trainer_device)
        rollout = cluster.start("rollout", "services.rollout", "--device", args.rollout_device)
        for proc in cluster.procs:
            cluster.wait_healthy(proc)
        cfg = load_config(overrides=[f"models.policy.load={model_dir}",
                                     f"runtime_args.weight_sync_bucket_mb={args.bucket_mb}"])
        setup = pb.SetupRequest(run_id="bench", config_yaml=config_to_yaml(cfg))
        t0 = time.perf_counter()
        limits = dict(max_message_mb=64, timeouts=cfg.runtime_args.rpc_timeout_s)
        tclient = TrainerClient(trainer.address, **limits, secret=secret)
        pool = RolloutPool([rollout.address], **limits, retries=0, max_sequences=cfg.runtime_args.sample_per_episode,
                           secrets={rollout.address: secret})
        tclient.call("Setup", setup, "setup")
        pool.call_all("Setup", setup, "setup")
        setup_s = time.perf_counter() - t0
        sync = WeightSync(Rendezvous("127.0.0.1"), tclient, pool, bucket_mb=args.bucket_mb)
        t0 = time.perf_counter()
        first = sync.sync(0)   # builds the group, then syncs
        group_s = time.perf_counter() - t0 - first["sync/send_seconds"]
        runs = [sync.sync(v) for v in range(1, args.iters + 1)]
        # the replica now serves the trainer's weights: their logprobs of the same tokens agree
        request = rpb.GenerateRequest(prompts=[rpb.Prompt(group_id="p-0", prompt_ids=ids_to_wire([11, 12, 13]))],
                                      sampling=pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=32,
                                                                 seed=1), n=2)
        samples = [decode_sample(m) for m in pool.replicas[0].stub.Generate(request)]
        # (the syncs above relabel the trainer's unchanged weights: the samples' version is the trainer's)
        agreement = logprob_agreement(tclient, samples, k=2, threshold=float("inf"), temperature=1.0,
                                      trainer_version=samples[0].version)
        info = tclient.call("GetInfo", pb.Empty())
        return {"setup_seconds": setup_s, "group_setup_seconds": group_s, "bytes": runs[0]["sync/bytes"],
                "params": sum(int(torch.tensor(list(p.shape)).prod()) for p in info.params),
                "sync_seconds": [r["sync/seconds"] for r in runs],
                "send_seconds": [r["sync/send_seconds"] for r in runs],
                "receive_seconds": [r["sync/receive_seconds"] for r in runs],
                "commit_seconds": [r["sync/commit_seconds"] for r in runs],
                "agreement_max_abs_diff": agreement, "rollout_version": pool.call_all("GetInfo", pb.Empty())[0].policy_version}
    finally:
        cluster.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="qwen3-1.7b")
    parser.add_argument("--trainer-device", default="cuda:0")
    parser.add_argument("--rollout-device", default="cuda:1")
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", help="write the result JSON here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as model_dir:
        Qwen3Config(**SHAPES[args.model], max_position_embeddings=4096).save_pretrained(model_dir)
        ours = measure_ours(model_dir, args)
    raw = measure_raw([args.trainer_device, args.rollout_device], int(ours["bytes"]), args.iters)
    ours_s, raw_s = statistics.median(ours["sync_seconds"]), statistics.median(raw)
    write_result(args.out, {
        "benchmark": "weight_sync", "model": args.model, "machine": machine(),
        "command": " ".join(["python"] + sys.argv), "devices": [args.trainer_device, args.rollout_device],
        "bucket_mb": args.bucket_mb, **ours, "raw_broadcast_seconds": raw,
        "median_sync_seconds": ours_s, "median_raw_seconds": raw_s,
        "sync_GBps": ours["bytes"] / ours_s / 1e9, "raw_GBps": ours["bytes"] / raw_s / 1e9,
        "ratio_raw_over_ours": raw_s / ours_s,
    })


if __name__ == "__main__":
    main()
