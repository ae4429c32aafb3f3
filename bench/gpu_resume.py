"""Resume across world sizes on GPUs: a run on a 2-rank trainer (torchrun, FSDP2 over NCCL) saves a
DCP checkpoint at episode 2; a 1-rank trainer then resumes it for episodes 3-4. Records both runs'
metrics for the resumed episodes side by side.

    python bench/gpu_resume.py --rollout-device cuda:1
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine, pin_gpu, write_result  # noqa: E402
from rlgrid.v1 import common_pb2 as pb  # noqa: E402
from rlgrid.v1 import coordinator_pb2 as cpb  # noqa: E402
from rlgrid.v1 import coordinator_pb2_grpc  # noqa: E402
from services.common.rpc import make_channel  # noqa: E402
from services.common.tiny_model import build_tiny_model  # noqa: E402
from services.coordinator.data import make_toy_dataset, toy_vocabulary  # noqa: E402
from services.coordinator.local import ROOT, LocalCluster  # noqa: E402

KEYS = ("reward/mean", "train/loss", "train/grad_norm", "agreement/max_abs_diff", "rollout/policy_version")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollout-device", default="cuda:1")
    parser.add_argument("--ranks", type=int, default=2, help="trainer ranks of the first run (GPUs from cuda:0)")
    parser.add_argument("--device", default="cuda", help="trainer device ('cpu' for a smoke test)")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="rlgrid-resume-")
    data = make_toy_dataset(os.path.join(work, "toy.jsonl"), n=256)
    model = build_tiny_model(os.path.join(work, "model"), toy_vocabulary(), with_weights=False, hidden=512,
                             layers=4, heads=8, kv_heads=4, head_dim=64, intermediate=1024)
    with open(os.path.join(ROOT, "configs", "demo_cpu.yaml")) as f:
        yaml = f.read()
    base = [f"runtime_args.data_path={data}", f"models.policy.load={model}", "runtime_args.num_episode=4",
            "models.policy.dtype=auto", "models.policy_trainer.dtype=auto", "runtime_args.logprob_diff_threshold=0.5",
            "models.policy_trainer.optimizer.lr=0.001"]
    cluster = LocalCluster(os.path.join(work, "logs"), roots=[work])   # the run's paths lie in work
    try:
        coord = cluster.start("coordinator", "services.coordinator", "--state-dir", os.path.join(work, "state"))
        cluster.wait_healthy(coord)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(coord.address))
        env, dev = pin_gpu(args.rollout_device)
        rollout = cluster.start("rollout", "services.rollout", "--coordinator", coord.address, "--device", dev, env=env)
        trainer = cluster.start("trainer-ranks", "services.trainer", "--coordinator", coord.address,
                                "--device", args.device, nproc=args.ranks)
        for proc in (rollout, trainer):
            cluster.wait_healthy(proc)

        def run(overrides: list[str]) -> tuple[cpb.RunInfo, dict]:
            r = stub.StartRun(cpb.StartRunRequest(config_yaml=yaml, overrides=base + overrides))
            events = list(stub.WatchRun(cpb.WatchRunRequest(run_id=r.run_id), timeout=900))
            info = stub.GetRun(cpb.RunRef(run_id=r.run_id))
            if info.state != cpb.FINISHED:
                raise SystemExit(f"run ended {cpb.RunState.Name(info.state)}: {info.error}")
            return info, {e.step: {k: e.metrics[k] for k in KEYS} for e in events if e.metrics}

        first, whole = run([f"runtime_args.output_dir={work}/a", "runtime_args.save_episode_interval=2"])
        checkpoint = os.path.join(first.output_dir, "runs", first.run_id, "checkpoint-2")
        cluster.stop(trainer)   # the same run continues on a trainer of another world size
        one = cluster.start("trainer-1rank", "services.trainer", "--coordinator", coord.address,
                            "--device", "cuda:0" if args.device == "cuda" else args.device)
        cluster.wait_healthy(one)
        while sum(w.kind == cpb.TRAINER for w in stub.ListWorkers(pb.Empty()).workers) < 2:
            time.sleep(0.2)
        # the stopped trainer stays listed for a while; the scheduler health-checks and skips it
        _, resumed = run([f"runtime_args.output_dir={work}/b", f"runtime_args.resume_from={checkpoint}"])
    finally:
        cluster.stop_all()
    write_result(args.out, {"benchmark": "gpu_resume", "machine": machine(), "command": " ".join(["python"] + sys.argv),
                            "saved_on_ranks": args.ranks, "resumed_on_ranks": 1,
                            "uninterrupted": {s: whole[s] for s in (3, 4)}, "resumed": resumed})


if __name__ == "__main__":
    main()
