"""Rollout replicas joining one running run, one by one (1 -> 2 -> ... -> N): rollout time per step
and samples/s per replica as they join, and what each join cost the run (time from the replica's
start to its join; the weight sync of the join step, which rebuilds the group, against a steady one).

    python bench/scale_join.py --replicas 3                                  # CPU: the demo's toy task
    python bench/scale_join.py --device cuda:0 --replicas 2 --shape qwen3-0.6b --samples 256 \
        --max-response 512 --steps-per-phase 6                               # replicas sharing one GPU

Every service runs on --device; on one GPU the trainer and all replicas share it (the weights then go
through CUDA IPC, as the coordinator plans for members on the trainer's GPU). Prints a table
last; writes JSON to --out and to $OUT/scale_join.json when OUT is set.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine, toy_tokenizer_model, write_result  # noqa: E402
from bench.gpu_trainer import SHAPES  # noqa: E402
from rlgrid.v1 import coordinator_pb2 as cpb  # noqa: E402
from rlgrid.v1 import coordinator_pb2_grpc  # noqa: E402
from services.common.rpc import make_channel  # noqa: E402
from services.coordinator.data import make_toy_dataset  # noqa: E402
from services.coordinator.local import ROOT, LocalCluster  # noqa: E402


class Events:
    """WatchRun of one run, collected in a thread."""

    def __init__(self, stub, run_id: str):
        self.items: list[tuple[float, cpb.RunEvent]] = []
        self.cond = threading.Condition()
        self.stream = stub.WatchRun(cpb.WatchRunRequest(run_id=run_id), timeout=7200)
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        try:
            for e in self.stream:
                with self.cond:
                    self.items.append((time.monotonic(), e))
                    self.cond.notify_all()
        except Exception:  # noqa: BLE001 - cancelled at the end
            pass

    def wait(self, predicate, start: int, timeout: float = 1800.0) -> int:
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                for i in range(i, len(self.items)):
                    e = self.items[i][1]
                    if e.state == cpb.FAILED:
                        raise SystemExit(f"the run failed: {e.message}")
                    if predicate(e):
                        return i
                i = len(self.items)
                if time.monotonic() > deadline:
                    raise SystemExit("timed out waiting for the run")
                self.cond.wait(1.0)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3, help="replicas at the end; they join one at a time")
    parser.add_argument("--steps-per-phase", type=int, default=8, help="steps recorded with each replica count")
    parser.add_argument("--device", default="cpu", help="every service's device (cpu, or cuda:0: one GPU shared)")
    parser.add_argument("--shape", default="toy", choices=["toy", *SHAPES])
    parser.add_argument("--samples", type=int, default=128, help="runtime_args.sample_per_episode")
    parser.add_argument("--max-response", type=int, default=0, help="models.policy.max_response_tokens_length")
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides, key=value")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="rlgrid-scale-")
    data = make_toy_dataset(os.path.join(work, "toy.jsonl"), n=max(256, args.samples))
    model = toy_tokenizer_model(os.path.join(work, "model"), args.shape)
    gpu = args.device.startswith("cuda")
    env = {"CUDA_VISIBLE_DEVICES": args.device.split(":", 1)[1]} if ":" in args.device and gpu else {}
    device = "cuda:0" if gpu else args.device
    overrides = [f"runtime_args.data_path={data}", f"models.policy.load={model}", f"runtime_args.output_dir={work}/out",
                 "runtime_args.num_episode=100000", f"runtime_args.sample_per_episode={args.samples}",
                 f"runtime_args.train_global_batch_size={args.samples // 2}"]
    if gpu:
        overrides += ["models.policy.dtype=auto", "models.policy_trainer.dtype=auto",
                      "runtime_args.logprob_diff_threshold=0.5", "models.policy_trainer.optimizer.lr=0.0001"]
    if args.max_response:
        overrides += [f"models.policy.max_response_tokens_length={args.max_response}",
                      f"models.policy_trainer.max_token_in_packing={max(8192, args.max_response + 1024)}"]
    overrides += args.set
    cluster = LocalCluster(os.path.join(work, "logs"), roots=[work])
    phases, joins = [], []
    load_before = os.getloadavg()   # other work on the machine shows here
    try:
        coord = cluster.start("coordinator", "services.coordinator", "--state-dir", os.path.join(work, "state"))
        cluster.wait_healthy(coord)
        for name in ("trainer", "rollout0"):
            cluster.start(name, f"services.{name.rstrip('0')}", "--coordinator", coord.address, "--device", device,
                          env=env)
        for proc in cluster.procs:
            cluster.wait_healthy(proc)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(coord.address))
        with open(os.path.join(ROOT, "configs", "demo_cpu.yaml")) as f:
            run = stub.StartRun(cpb.StartRunRequest(config_yaml=f.read(), overrides=overrides))
        events = Events(stub, run.run_id)
        at = 0
        for n in range(1, args.replicas + 1):
            if n > 1:   # one more replica, started while the run goes on
                started = time.monotonic()
                proc = cluster.start(f"rollout{n - 1}", "services.rollout", "--coordinator", coord.address,
                                     "--device", device, env=env)
                at = events.wait(lambda e, a=proc.address: f"rollout replica joined: {a}" in e.message, at)
                join_step = events.wait(lambda e: bool(e.metrics), at)   # the step whose sync it joined at
                joins.append({"replica": n, "seconds_from_start_to_join": events.items[at][0] - started,
                              "join_step_sync_seconds": events.items[join_step][1].metrics["time/sync"]})
                at = join_step + 1
            steps = []
            while len(steps) < args.steps_per_phase + 1:   # the first step of a phase is a warm-up
                at = events.wait(lambda e: bool(e.metrics), at) + 1
                m = dict(events.items[at - 1][1].metrics)
                if m["rollout/replicas"] == n:
                    steps.append(m)
            phases.append((n, steps[1:]))
        stub.StopRun(cpb.RunRef(run_id=run.run_id))
        events.stream.cancel()
    finally:
        cluster.stop_all()

    rows = []
    for n, steps in phases:
        rollout = statistics.median(s["time/rollout"] for s in steps)
        rate = statistics.median(s["rollout/samples"] / s["time/rollout"] for s in steps)
        rows.append({"replicas": n, "steps": len(steps), "median_rollout_seconds": rollout,
                     "median_samples_per_s": rate, "samples_per_s_per_replica": rate / n,
                     "median_step_seconds": statistics.median(s["time/step"] for s in steps),
                     "median_sync_seconds": statistics.median(s["time/sync"] for s in steps),
                     "steps_metrics": steps})
    steady_sync = {r["replicas"]: r["median_sync_seconds"] for r in rows}
    for j in joins:
        j["steady_sync_seconds_after"] = steady_sync.get(j["replica"])
    write_result(args.out or (os.path.join(os.environ["OUT"], "scale_join.json") if os.environ.get("OUT") else None), {
        "benchmark": "scale_join", "device": args.device, "shape": args.shape, "samples_per_step": args.samples,
        "machine": machine(), "command": " ".join(["python"] + sys.argv),
        "load_average_1_5_15_before_after": [list(load_before), list(os.getloadavg())], "phases": rows,
        "joins": joins})
    print(f"\n{'replicas':>8} {'rollout s':>10} {'samples/s':>10} {'per replica':>12} {'step s':>8} {'sync s':>8}")
    for r in rows:
        print(f"{r['replicas']:>8} {r['median_rollout_seconds']:>10.3f} {r['median_samples_per_s']:>10.1f} "
              f"{r['samples_per_s_per_replica']:>12.1f} {r['median_step_seconds']:>8.3f} {r['median_sync_seconds']:>8.3f}")
    for j in joins:
        print(f"replica {j['replica']} joined {j['seconds_from_start_to_join']:.1f} s after its start; the join "
              f"step's sync took {j['join_step_sync_seconds']:.3f} s (steady: {j['steady_sync_seconds_after']:.3f} s)")


if __name__ == "__main__":
    main()
