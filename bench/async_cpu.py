"""Synchronous loop against one-step-off-policy async (runtime_args.off_policy_steps=1), same services:
one coordinator, one trainer and one rollout replica on CPU, the demo's toy task and settings.
Runs alternate (sync, async, sync, async, ...) on the same processes, so drift on a shared machine
hits both alike; each run's first step (warm-up) is left out of the medians.

    OMP_NUM_THREADS=1 python bench/async_cpu.py --steps 30 --repeats 2 --out bench/results/<date>_cpu2_async.json

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
from bench.common import machine, write_result  # noqa: E402
from rlgrid.v1 import coordinator_pb2 as cpb  # noqa: E402
from rlgrid.v1 import coordinator_pb2_grpc  # noqa: E402
from services.common.rpc import make_channel  # noqa: E402
from services.common.tiny_model import build_tiny_model  # noqa: E402
from services.coordinator.data import make_toy_dataset, toy_vocabulary  # noqa: E402
from services.coordinator.local import ROOT, LocalCluster  # noqa: E402

MODES = {
    "sync": [],
    "async": ["runtime_args.off_policy_steps=1"],
    "async+tis": ["runtime_args.off_policy_steps=1", "models.policy_trainer.tis_cap=2.0"],
}
KEYS = ["time/step", "time/rollout", "time/train", "time/sync", "overlap/rollout_busy_frac",
        "overlap/trainer_busy_frac", "overlap/trainer_wait_s", "overlap/rollout_wait_s"]


def run_once(stub, overrides: list[str]) -> list[dict]:
    with open(os.path.join(ROOT, "configs", "demo_cpu.yaml")) as f:
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
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides for every run, key=value")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="rlgrid-async-")
    data = make_toy_dataset(os.path.join(work, "toy.jsonl"), n=128, seed=0)
    model = build_tiny_model(os.path.join(work, "tiny-qwen3"), toy_vocabulary(), with_weights=False)
    cluster = LocalCluster(os.path.join(work, "logs"), roots=[work])
    runs: dict[str, list[list[dict]]] = {m: [] for m in args.modes}
    try:
        coord, _, _ = cluster.deploy(os.path.join(work, "state"), replicas=1)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(coord.address))
        base = [f"runtime_args.data_path={data}", f"models.policy.load={model}",
                f"runtime_args.output_dir={work}/out", f"runtime_args.num_episode={args.steps}", *args.set]
        for _ in range(args.repeats):
            for mode in args.modes:
                runs[mode].append(run_once(stub, base + MODES[mode]))
                print(f"{mode}: {len(runs[mode][-1])} steps, median step "
                      f"{statistics.median(m['time/step'] for m in runs[mode][-1][1:]):.3f} s", flush=True)
    finally:
        cluster.stop_all()
    summary = {mode: summarise(r) for mode, r in runs.items()}
    result = {"benchmark": "async_cpu", "machine": machine(), "command": " ".join(["python"] + sys.argv),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "services": "coordinator, trainer, 1 replica (CPU)",
              "summary": summary, "runs": runs}
    if "sync" in summary:
        result["step_time_ratio_vs_sync"] = {m: s["time/step"] / summary["sync"]["time/step"]
                                             for m, s in summary.items()}
    write_result(args.out, result)
    print(f"\n{'mode':<10} {'step s':>7} {'rollout s':>9} {'train s':>8} {'sync s':>7} {'roll busy':>9} "
          f"{'train busy':>10} {'train wait':>10} {'roll wait':>9} {'reward 5->10':>14}")
    for mode, s in summary.items():
        print(f"{mode:<10} {s['time/step']:7.3f} {s['time/rollout']:9.3f} {s['time/train']:8.3f} {s['time/sync']:7.3f} "
              f"{s['overlap/rollout_busy_frac']:9.2f} {s['overlap/trainer_busy_frac']:10.2f} "
              f"{s['overlap/trainer_wait_s']:10.3f} {s['overlap/rollout_wait_s']:9.3f} "
              f"{s['reward_first5']:6.3f}->{s['reward_last10']:.3f}")


if __name__ == "__main__":
    main()
