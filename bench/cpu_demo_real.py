"""Records `make demo-real` runs (SmolLM2-135M-Instruct, held-out arithmetic, CPU) under bench/results/:
held-out accuracy before and after with the number of eval prompts and the exact McNemar p, wall time,
the step-time breakdown and the machine's load, one JSON and one PNG per seed.

    python bench/cpu_demo_real.py --seeds 1 2                 # runs `python -m services.coordinator.demo --real`
    python bench/cpu_demo_real.py --collect RUN_DIR --wall 900 # records a run that already finished
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine, write_result  # noqa: E402
from services.coordinator.demo import greedy_outcomes, mcnemar_p  # noqa: E402
from services.coordinator.local import ROOT  # noqa: E402
from services.coordinator.plot import plot_run, read_metrics  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")


def collect(run_dir: str, wall: float | None, extra: dict) -> dict:
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    steps = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    first, last = evals[0], evals[-1]
    before, after = greedy_outcomes(run_dir, first["step"]), greedy_outcomes(run_dir, last["step"])
    return {
        "benchmark": "cpu_demo_real", "machine": {**machine(), "load_average_1_5_15": os.getloadavg()},
        "run_id": os.path.basename(run_dir), "wall_seconds": wall, **extra,
        "eval_prompts": int(first["eval/prompts"]),
        "greedy_accuracy": [r["eval/accuracy"] for r in evals],
        "sampled_accuracy": [r["eval/sampled/accuracy"] for r in evals],
        "eval_steps": [r["step"] for r in evals],
        "greedy_correct_before_after": [sum(before), sum(after)],
        "greedy_gained_lost": [sum(a and not b for b, a in zip(before, after)),
                               sum(b and not a for b, a in zip(before, after))],
        "mcnemar_p_greedy": mcnemar_p(before, after),
        "eval_response_length": [r["eval/response_length"] for r in evals],
        "train_reward": [r["reward/mean"] for r in steps],
        "seconds": {"steps": sum(r["time/step"] for r in steps), "evals": sum(r["time/eval"] for r in evals)},
        "median_step_breakdown_seconds": {k: statistics.median(r[k] for r in steps) for k in sorted(steps[0])
                                          if k.startswith("time/")},
        "evals": evals, "steps": steps,
    }


def record(result: dict, run_dir: str, name: str) -> None:
    date = result["machine"]["date"]
    write_result(os.path.join(RESULTS, f"{date}_cpu2_{name}.json"), result)
    plot_run(os.path.join(run_dir, "metrics.jsonl"), os.path.join(RESULTS, f"{date}_cpu2_{name}.png"),
             title=f"{result['run_id']} (CPU, 2 cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--collect", help="a finished run's directory (runs/<run_id>) to record instead")
    parser.add_argument("--wall", type=float, help="with --collect: the run's wall time, if known")
    parser.add_argument("--name", help="result file name after the date and machine (default demo_real_seed<N>)")
    args = parser.parse_args()
    if args.collect:
        seed = re.search(r"seed: (\d+)", open(os.path.join(args.collect, "config.yaml")).read()).group(1)
        record(collect(args.collect, args.wall, {"seed": int(seed), "command": "make demo-real"}), args.collect,
               args.name or f"demo_real_seed{seed}")
        return
    for seed in args.seeds:
        workdir = os.path.join(ROOT, "output", f"demo-real-seed{seed}")
        shutil.rmtree(workdir, ignore_errors=True)
        command = [sys.executable, "-m", "services.coordinator.demo", "--real", "--workdir", workdir,
                   f"runtime_args.seed={seed}", f"runtime_args.output_dir={workdir}/run"]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n")
        run_id = re.search(r"^run (\S+):", proc.stdout, re.M).group(1)
        run_dir = os.path.join(workdir, "run", "runs", run_id)
        record(collect(run_dir, wall, {"seed": seed, "exit_code": proc.returncode,
                                       "command": f"make demo-real ARGS='runtime_args.seed={seed}'"}),
               run_dir, args.name or f"demo_real_seed{seed}")


if __name__ == "__main__":
    main()
