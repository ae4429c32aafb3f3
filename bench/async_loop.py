"""Synchronous loop against one-step-off-policy async (runtime_args.off_policy_steps=1), same services:
one coordinator, one trainer and the rollout replicas, the demo's task and settings. Runs alternate
(sync, async, async+tis, sync, ...) on the same processes, so drift on a shared machine hits every
mode alike; each run's first step (warm-up) is left out of the medians.

CPU (the demo's tiny model; a seeded run is deterministic, so the rewards are the same every repeat):

    OMP_NUM_THREADS=1 python bench/async_loop.py --steps 30 --repeats 3 --out bench/results/<date>_cpu2_async.json

GPU (a Qwen3 shape, random init, for timing: the rewards mean nothing), trainer and replica on one GPU
(auto placement: colocated when synchronous, disaggregated when async) or on two:

    python bench/async_loop.py --trainer-device cuda:0 --rollout-devices cuda:0 --shape qwen3-0.6b \
        --samples 64 --max-response 256 --steps 10 --repeats 1

Prints a table last: median step time, the overlap metrics (each side's busy fraction and wait) and
the reward learnt (mean of the first 5 steps, of the last 10), per mode.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine, start_workers, toy_tokenizer_model, write_result  # noqa: E402
from bench.gpu_trainer import SHAPES  # noqa: E402
from rlgrid.v1 import coordinator_pb2 as cpb  # noqa: E402
from rlgrid.v1 import coordinator_pb2_grpc  # noqa: E402
from services.common.rpc import make_channel  # noqa: E402
from services.coordinator.data import make_toy_dataset  # noqa: E402
from services.coordinator.local import ROOT, LocalCluster  # noqa: E402

MODES = {
    "sync": [],
    "async": ["runtime_args.off_policy_steps=1"],
    "async+tis": ["runtime_args.off_policy_steps=1", "models.policy_trainer.tis_cap=2.0"],
}
KEYS = ["time/step", "time/rollout", "time/train", "time/proximal_logprobs", "time/sync", "overlap/rollout_busy_frac",
        "overlap/trainer_busy_frac", "overlap/trainer_wait_s", "overlap/rollout_wait_s"]


def run_once(stub, overrides: list[str]) -> list[dict]:
    with open(os.path.join(ROOT, "configs", "demo_cpu.yaml")) as f:   # the demo's settings, overridden
        run = stub.StartRun(cpb.StartRunRequest(config_yaml=f.read(), overrides=overrides))
    events = list(stub.WatchRun(cpb.WatchRunRequest(run_id=run.run_id), timeout=3600))
    info = stub.GetRun(cpb.RunRef(run_id=run.run_id))
    if info.state != cpb.FINISHED:
        sys.exit(f"run ended {cpb.RunState.Name(info.state)}: {info.error}")
    return [dict(e.metrics) for e in events if e.metrics]


def summarise(runs: list[list[dict]]) -> dict:
    timed = [m for steps in runs for m in steps[1:]]
    out = {k: statistics.median(m[k] for m in timed) for k in KEYS}
    out["reward_first5"] = statistics.fmean(statistics.fmean(m["reward/mean"] for m in s[:5]) for s in runs)
    out["reward_last10"] = statistics.fmean(statistics.fmean(m["reward/mean"] for m in s[-10:]) for s in runs)
    return out



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="runtime_args.num_episode of each run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, interleaved")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--trainer-device", default="cpu")
    parser.add_argument("--rollout-devices", nargs="+", default=["cpu"], help="one replica per device")
    parser.add_argument("--shape", default="toy", choices=["toy", *SHAPES])
    parser.add_argument("--samples", type=int, default=0,
                        help="runtime_args.sample_per_episode (two optimizer steps each; 0 = the demo's 128)")
    parser.add_argument("--max-response", type=int, default=0, help="models.policy.max_response_tokens_length")
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides for every run, key=value")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="rlgrid-async-")
    data = make_toy_dataset(os.path.join(work, "toy.jsonl"), n=max(128, args.samples), seed=0)
    model = toy_tokenizer_model(os.path.join(work, "model"), args.shape)
    cluster = LocalCluster(os.path.join(work, "logs"), roots=[work])
    runs: dict[str, list[list[dict]]] = {m: [] for m in args.modes}
    load: dict[str, list[float]] = {m: [] for m in args.modes}
    base = [f"runtime_args.data_path={data}", f"models.policy.load={model}",
            f"runtime_args.output_dir={work}/out", f"runtime_args.num_episode={args.steps}"]
    if any(d.startswith("cuda") for d in (args.trainer_device, *args.rollout_devices)):   # bf16 on both sides
        base += ["models.policy.dtype=auto", "models.policy_trainer.dtype=auto", "runtime_args.logprob_diff_threshold=2"]
    if args.samples:
        base += [f"runtime_args.sample_per_episode={args.samples}", f"runtime_args.train_global_batch_size={args.samples // 2}"]
    if args.max_response:
        base += [f"models.policy.max_response_tokens_length={args.max_response}",
                 f"models.policy_trainer.max_token_in_packing={max(8192, args.max_response + 1024)}"]
    try:
        coord = cluster.start("coordinator", "services.coordinator", "--state-dir", os.path.join(work, "state"))
        cluster.wait_healthy(coord)
        start_workers(cluster, coord.address, args.trainer_device, args.rollout_devices)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(coord.address))
        for _ in range(args.repeats):
            for mode in args.modes:
                load[mode].append(os.getloadavg()[0])   # a shared machine: how busy it was as each run began
                runs[mode].append(run_once(stub, base + MODES[mode] + args.set))
                print(f"{mode}: {len(runs[mode][-1])} steps, median step "
                      f"{statistics.median(m['time/step'] for m in runs[mode][-1][1:]):.3f} s", flush=True)
    finally:
        cluster.stop_all()
    summary = {mode: summarise(r) for mode, r in runs.items()}
    result = {"benchmark": "async_loop", "machine": machine(), "command": " ".join(["python"] + sys.argv),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "shape": args.shape,
              "trainer_device": args.trainer_device, "rollout_devices": args.rollout_devices,
              "shared_gpu": args.trainer_device.startswith("cuda") and args.trainer_device in args.rollout_devices,
              "load_average_1min_at_start": load, "summary": summary, "runs": runs}
    if "sync" in summary:
        result["step_time_ratio_vs_sync"] = {m: s["time/step"] / summary["sync"]["time/step"]
                                             for m, s in summary.items()}
    write_result(args.out, result)
    print(f"\n{'mode':<10} {'step s':>7} {'rollout s':>9} {'train s':>8} {'prox s':>7} {'sync s':>7} "
          f"{'roll busy':>9} {'train busy':>10} {'train wait':>10} {'roll wait':>9} {'reward 5->10':>14}")
    for mode, s in summary.items():
        print(f"{mode:<10} {s['time/step']:7.3f} {s['time/rollout']:9.3f} {s['time/train']:8.3f} "
              f"{s['time/proximal_logprobs']:7.3f} {s['time/sync']:7.3f} {s['overlap/rollout_busy_frac']:9.2f} "
              f"{s['overlap/trainer_busy_frac']:10.2f} {s['overlap/trainer_wait_s']:10.3f} "
              f"{s['overlap/rollout_wait_s']:9.3f} {s['reward_first5']:6.3f}->{s['reward_last10']:.3f}")


if __name__ == "__main__":
    main()
