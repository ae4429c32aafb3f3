"""The main job on CPU, all services local: `make demo` (a tiny random Qwen3 learns a toy echo task) and
`make demo-real` (SmolLM2-135M-Instruct learns held-out arithmetic).

Starts the coordinator, one trainer (FSDP2, gloo) and one rollout service (built-in engine) as
separate processes, starts a run through the coordinator's gRPC API, prints progress, then a summary
and a PNG of the curves. With --coordinator it starts no process and drives a coordinator already
running with its workers (docker/compose.cpu.yaml's `demo` service does).

    python -m services.coordinator.demo [--real] [--coordinator HOST:PORT] [overrides ...]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import grpc

from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc
from services.common.config import ConfigError, load_config
from services.common.import_gguf import ImportError_, import_gguf, shipped_smollm2
from services.common.rpc import make_channel
from services.common.tiny_model import build_tiny_model
from services.coordinator.arithmetic import write_split
from services.coordinator.data import make_toy_dataset, toy_vocabulary
from services.coordinator.local import ROOT, LocalCluster
from services.coordinator.plot import plot_run, read_metrics

DEMO_CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")
REAL_CONFIG = os.path.join(ROOT, "configs", "smollm2_arithmetic_cpu.yaml")
ARITHMETIC = dict(train=1000, eval=100, seed=0, max_number=10)
"""The split `make demo-real` writes (see services.coordinator.arithmetic)."""


def prepare(cfg) -> None:
    """Toy prompts and a tiny Qwen3 (config + tokenizer; services random-init from the seed)."""
    make_toy_dataset(cfg.runtime_args.data_path, n=256, seed=0)
    if not os.path.isfile(os.path.join(cfg.models.policy.load, "config.json")):
        build_tiny_model(cfg.models.policy.load, toy_vocabulary(), arch="qwen3", with_weights=False)


def prepare_real(cfg) -> None:
    """SmolLM2-135M-Instruct imported from its GGUF (once), and the arithmetic train/eval split."""
    ra, model = cfg.runtime_args, cfg.models.policy.load
    if not os.path.isfile(os.path.join(model, "model.safetensors")):
        print(f"importing SmolLM2-135M-Instruct into {model} (once)", flush=True)
        report = import_gguf(shipped_smollm2(), model)
        print(f"imported: logits vs the GGUF differ by at most {report.max_abs_logit_diff:.2g}", flush=True)
    folder = os.path.dirname(ra.data_path)
    if not (os.path.isfile(ra.data_path) and os.path.isfile(ra.eval_data_path)):
        write_split(folder, **ARITHMETIC)
    for key, path in (("data_path", ra.data_path), ("eval_data_path", ra.eval_data_path)):
        if not os.path.isfile(path):
            raise ConfigError(f"runtime_args.{key}={path!r} does not exist; the demo writes "
                              f"{folder}/train.jsonl and {folder}/eval.jsonl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. runtime_args.num_episode=10")
    parser.add_argument("--real", action="store_true",
                        help=f"SmolLM2-135M-Instruct on held-out arithmetic ({os.path.relpath(REAL_CONFIG, ROOT)})")
    parser.add_argument("--workdir", help="logs and the coordinator's state (default output/demo or output/demo-real)")
    parser.add_argument("--prepare", action="store_true", help="only write the data and the model")
    parser.add_argument("--coordinator", help="host:port of a running coordinator to start the run on (its "
                                              "config paths resolve there, so share the output directory; "
                                              "RLGRID_AUTH_TOKEN is sent when set)")
    args = parser.parse_args(argv)
    config_path = REAL_CONFIG if args.real else DEMO_CONFIG
    workdir = args.workdir or os.path.join(ROOT, "output", "demo-real" if args.real else "demo")
    try:
        cfg = load_config(path=config_path, overrides=args.overrides)
        os.chdir(ROOT)   # the demo configs' paths are relative to the repository root
        (prepare_real if args.real else prepare)(cfg)
    except (ConfigError, ImportError_) as exc:   # the user's input: the message alone, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.prepare:
        print(f"wrote {cfg.runtime_args.data_path} and {cfg.models.policy.load}")
        return 0
    if args.coordinator:
        return drive(args.coordinator, config_path, args.overrides, "")
    # the trainer and the rollout service take turns: each may use every core (the toy model wants one)
    threads = str(os.cpu_count() or 1) if args.real else "1"
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    cluster = LocalCluster(os.path.join(workdir, "logs"))
    try:
        print("starting the coordinator, a trainer and a rollout service", flush=True)
        coordinator, _, _ = cluster.deploy(os.path.join(workdir, "coordinator"))
        return drive(coordinator.address, config_path, args.overrides, f"; logs in {workdir}/logs")
    finally:
        cluster.stop_all()


def drive(address: str, config_path: str, overrides: list[str], where: str) -> int:
    """Starts the run on the coordinator at `address`, prints its progress, then the summary."""
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(address))
    with open(config_path) as f:
        try:
            run = stub.StartRun(cpb.StartRunRequest(config_yaml=f.read(), overrides=overrides))
        except grpc.RpcError as exc:
            print(f"error: {exc.details()}", file=sys.stderr)
            return 2
    print(f"run {run.run_id}: {run.total_steps} steps{where}", flush=True)
    for event in stub.WatchRun(cpb.WatchRunRequest(run_id=run.run_id)):
        print(progress_line(event), flush=True)
    final = stub.GetRun(cpb.RunRef(run_id=run.run_id))
    if final.state != cpb.FINISHED:
        print(f"run ended {cpb.RunState.Name(final.state)}: {final.error}", file=sys.stderr)
        return 1
    return summarize(final)


def progress_line(event: cpb.RunEvent) -> str:
    m = event.metrics
    if "eval/accuracy" in m:
        return (f"eval {event.step:3d}  held-out accuracy {m['eval/accuracy']:.3f} greedy, "
                f"{m['eval/sampled/accuracy']:.3f} sampled ({m['eval/prompts']:.0f} prompts)  "
                f"len {m['eval/response_length']:4.1f}  {m['time/eval']:.1f}s")
    if m:
        return (f"step {event.step:3d}  reward {m['reward/mean']:.3f}  len {m['response_length/mean']:4.1f}  "
                f"loss {m.get('train/loss', 0):+.4f}  agree {m.get('agreement/max_abs_diff', math.nan):.1e}  "
                f"replicas {m['rollout/replicas']:.0f}  {m['time/step']:.1f}s")
    return f"[{cpb.RunState.Name(event.state)}] {event.message}"


def mcnemar_p(before: list[bool], after: list[bool]) -> float:
    """Two-sided exact McNemar test on paired outcomes: the chance of a split of the changed prompts at
    least this uneven if a change was as likely to be a gain as a loss."""
    gained = sum(a and not b for b, a in zip(before, after))
    lost = sum(b and not a for b, a in zip(before, after))
    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def greedy_outcomes(run_dir: str, step: int) -> list[bool]:
    """Per held-out prompt (in file order), whether the greedy answer at `step` earned full credit."""
    with open(os.path.join(run_dir, "eval", f"step-{step}.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["reward"] >= 1.0 for r in sorted((r for r in rows if r["mode"] == "greedy"), key=lambda r: r["index"])]


def summarize(run: cpb.RunInfo) -> int:
    run_dir = os.path.join(run.output_dir, "runs", run.run_id)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    rows = read_metrics(metrics_path)
    png = plot_run(metrics_path, os.path.join(run_dir, "curves.png"), title=run.run_id)
    train = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    seconds = sum(r["time/step"] for r in train) + sum(r["time/eval"] for r in evals)
    k = max(1, len(train) // 5)
    first = sum(r["reward/mean"] for r in train[:k]) / k
    last = sum(r["reward/mean"] for r in train[-k:]) / k
    print(f"\nsummary: mean training reward {first:.3f} (first {k} steps) -> {last:.3f} (last {k} steps); "
          f"{len(train)} steps, {seconds:.0f}s")
    if len(evals) >= 2:
        a, b = evals[0], evals[-1]
        p = mcnemar_p(greedy_outcomes(run_dir, a["step"]), greedy_outcomes(run_dir, b["step"]))
        print(f"held-out accuracy ({a['eval/prompts']:.0f} prompts), greedy: {a['eval/accuracy']:.3f} (step "
              f"{a['step']}) -> {b['eval/accuracy']:.3f} (step {b['step']}), exact McNemar p = {p:.2g}; at "
              f"temperature: {a['eval/sampled/accuracy']:.3f} -> {b['eval/sampled/accuracy']:.3f}")
        improved = b["eval/accuracy"] > a["eval/accuracy"] and p < 0.05
    else:
        improved = last > first
    print(f"plot: {png}")
    return 0 if improved else 1


if __name__ == "__main__":
    sys.exit(main())
