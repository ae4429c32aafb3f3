"""The main job on the embedded default: CPU, a tiny Qwen3, the toy echo task, all services local.

Starts the coordinator, one trainer (FSDP2, gloo) and one rollout service (built-in engine) as
separate processes, starts a run from configs/demo_cpu.yaml through the coordinator's gRPC API,
prints progress, then a summary and a PNG plot. With --coordinator it starts no process and drives
a coordinator already running with its workers (docker/compose.cpu.yaml's `demo` service does).

    python -m services.coordinator.demo [--coordinator HOST:PORT] [overrides ...]
"""
from __future__ import annotations

import argparse
import os
import sys

from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc
from services.common.config import load_config
from services.common.rpc import make_channel
from services.common.tiny_model import build_tiny_model
from services.coordinator.data import make_toy_dataset, toy_vocabulary
from services.coordinator.local import ROOT, LocalCluster
from services.coordinator.plot import plot_run, read_metrics

DEMO_CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")


def prepare(cfg) -> None:
    """Toy prompts and a tiny Qwen3 (config + tokenizer; services random-init from the seed)."""
    make_toy_dataset(cfg.runtime_args.data_path, n=256, seed=0)
    if not os.path.isfile(os.path.join(cfg.models.policy.load, "config.json")):
        build_tiny_model(cfg.models.policy.load, toy_vocabulary(), arch="qwen3", with_weights=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. runtime_args.num_episode=10")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "output", "demo"))
    parser.add_argument("--prepare", action="store_true", help="only write the toy data and the tiny model")
    parser.add_argument("--coordinator", help="host:port of a running coordinator to start the run on (its "
                                              "config paths resolve there, so share the output directory; "
                                              "RLGRID_AUTH_TOKEN is sent when set)")
    args = parser.parse_args()

    cfg = load_config(path=DEMO_CONFIG, overrides=args.overrides)
    os.chdir(ROOT)   # the demo config's paths are relative to the repository root
    prepare(cfg)
    if args.prepare:
        print(f"wrote {cfg.runtime_args.data_path} and {cfg.models.policy.load}")
        return 0
    if args.coordinator:
        return drive(args.coordinator, args.overrides, "")
    cluster = LocalCluster(os.path.join(args.workdir, "logs"))
    try:
        coordinator, _, _ = cluster.deploy(os.path.join(args.workdir, "coordinator"))
        return drive(coordinator.address, args.overrides, f"; logs in {args.workdir}/logs")
    finally:
        cluster.stop_all()


def drive(address: str, overrides: list[str], where: str) -> int:
    """Starts the demo run on the coordinator at `address`, prints its steps, then the summary."""
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(address))
    with open(DEMO_CONFIG) as f:
        run = stub.StartRun(cpb.StartRunRequest(config_yaml=f.read(), overrides=overrides))
    print(f"run {run.run_id}: {run.total_steps} steps{where}", flush=True)
    for event in stub.WatchRun(cpb.WatchRunRequest(run_id=run.run_id)):
        m = event.metrics
        if m:
            print(f"step {event.step:3d}  reward {m['reward/mean']:.3f}  len {m['response_length/mean']:4.1f}  "
                  f"loss {m.get('train/loss', 0):+.4f}  agree {m['agreement/max_abs_diff']:.1e}  "
                  f"replicas {m['rollout/replicas']:.0f}  {m['time/step']:.1f}s", flush=True)
        elif event.message:
            print(f"[{cpb.RunState.Name(event.state)}] {event.message}", flush=True)
    final = stub.GetRun(cpb.RunRef(run_id=run.run_id))
    if final.state != cpb.FINISHED:
        print(f"run ended {cpb.RunState.Name(final.state)}: {final.error}", file=sys.stderr)
        return 1
    return summarize(final)


def summarize(run: cpb.RunInfo) -> int:
    metrics_path = os.path.join(run.output_dir, "runs", run.run_id, "metrics.jsonl")
    rows = read_metrics(metrics_path)
    k = max(1, len(rows) // 5)
    first = sum(r["reward/mean"] for r in rows[:k]) / k
    last = sum(r["reward/mean"] for r in rows[-k:]) / k
    png = plot_run(metrics_path, os.path.join(run.output_dir, "runs", run.run_id, "reward.png"))
    print(f"\nsummary: mean reward {first:.3f} (first {k} steps) -> {last:.3f} (last {k} steps); "
          f"{len(rows)} steps, {sum(r['time/step'] for r in rows):.0f}s\nplot: {png}")
    return 0 if last > first else 1


if __name__ == "__main__":
    sys.exit(main())
