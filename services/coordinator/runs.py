"""Runs: state, events for WatchRun, pause/stop control points, persistence under the output dir.

Each run writes `<runtime_args.output_dir>/runs/<run_id>/` with state.json, config.yaml,
metrics.jsonl (one row per step, and one per held-out evaluation), eval/step-<n>.jsonl (every
evaluation answer) and, when TensorBoard is installed, tensorboard/; the coordinator's state dir keeps
an index so a restarted coordinator lists them, and resumes those that were active (recovery.py). A
run_id starts with runtime_args.exp_name.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

from rlgrid.v1 import coordinator_pb2 as cpb
from services.coordinator import tensorboard_events

TERMINAL = {cpb.STOPPED, cpb.FAILED, cpb.FINISHED}


class StopRequested(Exception):
    """Raised at a control point after StopRun."""


@dataclass
class Run:
    run_id: str
    config_yaml: str
    output_dir: str
    total_steps: int
    state: int = cpb.PENDING
    step: int = 0
    error: str = ""
    created_at: float = field(default_factory=time.time)
    last_metrics: dict[str, float] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    pause_requested: bool = False
    stop_requested: bool = False
    listeners: list = field(default_factory=list)   # called with (run, step, metrics) after each step

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self._events_file = None   # TensorBoard, opened at the first metrics

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, "runs", self.run_id)

    # ---- used by the loop ---------------------------------------------------------------------
    def control_point(self) -> None:
        """Between steps: blocks while paused, raises StopRequested after StopRun."""
        with self.cond:
            if self.pause_requested and self.state == cpb.RUNNING:
                self._set_state(cpb.PAUSED, "paused")
            while self.pause_requested and not self.stop_requested:
                self.cond.wait()
            if self.stop_requested:
                raise StopRequested()
            if self.state == cpb.PAUSED:
                self._set_state(cpb.RUNNING, "resumed")

    def record_step(self, step: int, metrics: dict[str, float]) -> None:
        with self.cond:
            # GetRun shows the latest value of every metric: a step keeps the last evaluation's
            self.step, self.last_metrics = step, {**self._eval_metrics(), **metrics}
            self._write_metrics(step, metrics)
            self._event(message=f"step {step}/{self.total_steps}", metrics=metrics)
            self.persist()
        for listener in self.listeners:
            listener(self, step, metrics)

    def record_eval(self, step: int, metrics: dict[str, float], samples: list[dict]) -> None:
        """A held-out evaluation after `step` steps: a metrics row, an event, and every answer in
        eval/step-<step>.jsonl."""
        with self.cond:
            os.makedirs(os.path.join(self.run_dir, "eval"), exist_ok=True)
            with open(os.path.join(self.run_dir, "eval", f"step-{step}.jsonl"), "w") as f:
                f.writelines(json.dumps(s) + "\n" for s in samples)
            self.last_metrics = {**self.last_metrics, **metrics}
            self._write_metrics(step, metrics)
            summary = ", ".join(f"{k.removeprefix('eval/')} {metrics[k]:.3f}" for k in
                                ("eval/accuracy", "eval/sampled/accuracy") if k in metrics)
            self._event(message=f"eval at step {step}: {summary}", metrics=metrics, step=step)
            self.persist()
        for listener in self.listeners:
            listener(self, step, metrics)
    def evaluated(self, step: int) -> bool:
        """Whether the held-out evaluation after `step` is recorded (a restart resuming at `step` keeps it)."""
        return os.path.exists(os.path.join(self.run_dir, "eval", f"step-{step}.jsonl"))

    def rollback(self, episode: int, message: str) -> None:
        """The run goes on after `episode` (a restart resumed it from that checkpoint): the records of later
        steps leave metrics.jsonl and eval/ (those steps are redone), and an event says so with `message`."""
        with self.cond:
            evals = os.path.join(self.run_dir, "eval")
            for name in os.listdir(evals) if os.path.isdir(evals) else []:
                match = re.fullmatch(r"step-(\d+)\.jsonl", name)
                if match and int(match.group(1)) > episode:
                    os.remove(os.path.join(evals, name))
            path = os.path.join(self.run_dir, "metrics.jsonl")
            kept: list[dict] = []
            if os.path.exists(path):
                with open(path) as f:
                    kept = [r for r in map(json.loads, f) if r["step"] <= episode]
                with open(path + ".tmp", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
                os.replace(path + ".tmp", path)
            self.step = episode
            self.last_metrics = {k: v for k, v in kept[-1].items() if k != "step"} if kept else {}
            self._event(message=message)
            self.persist()

    def log(self, message: str) -> None:
        with self.cond:
            self._event(message=message)

    def set_state(self, state: int, message: str = "", error: str = "") -> None:
        with self.cond:
            self.error = error or self.error
            self._set_state(state, message or error)

    def fail(self, error: str, metrics: dict[str, float] | None = None) -> None:
        """FAILED with `error`; `metrics` the failing step measured before it failed (e.g. the agreement
        check's difference) go into last_metrics, the FAILED event and the listeners (Prometheus)."""
        metrics = dict(metrics or {})
        with self.cond:
            self.error, self.state = error, cpb.FAILED
            self.last_metrics.update(metrics)
            self._event(message=error, metrics=metrics)
            self.persist()
        if metrics:
            for listener in self.listeners:
                listener(self, self.step, metrics)

    # ---- internals ----------------------------------------------------------------------------
    def _eval_metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.last_metrics.items() if k.startswith("eval/")}

    def _write_metrics(self, step: int, metrics: dict[str, float]) -> None:
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._events_file is None:
            self._events_file = tensorboard_events.open_writer(os.path.join(self.run_dir, "tensorboard")) or False
        if self._events_file:
            self._events_file.write(step, metrics)

    def _set_state(self, state: int, message: str) -> None:
        self.state = state
        self._event(message=message)
        self.persist()
        if state in TERMINAL and self._events_file:
            self._events_file.close()
            self._events_file = None

    def _event(self, message: str = "", metrics: dict | None = None, step: int | None = None) -> None:
        self.events.append({"state": self.state, "step": self.step if step is None else step,
                            "metrics": metrics or {}, "message": message,
                            "time": time.time()})
        self.cond.notify_all()

    def persist(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        state = {k: getattr(self, k) for k in ("run_id", "output_dir", "total_steps", "state", "step", "error",
                                               "created_at", "last_metrics")}
        tmp = os.path.join(self.run_dir, "state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, os.path.join(self.run_dir, "state.json"))

    def to_proto(self) -> cpb.RunInfo:
        return cpb.RunInfo(run_id=self.run_id, state=self.state, step=self.step, total_steps=self.total_steps,
                           output_dir=self.output_dir, error=self.error, last_metrics=self.last_metrics,
                           config_yaml=self.config_yaml, created_at=self.created_at)


class RunStore:
    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        os.makedirs(state_dir, exist_ok=True)
        self.index_path = os.path.join(state_dir, "runs.jsonl")
        self.runs: dict[str, Run] = {}
        self.interrupted: list[Run] = []   # active when the coordinator stopped: they resume (recovery.py)
        self.lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        if not os.path.exists(self.index_path):
            return
        with open(self.index_path) as f:
            for line in f:
                entry = json.loads(line)
                run_dir = os.path.join(entry["output_dir"], "runs", entry["run_id"])
                try:
                    with open(os.path.join(run_dir, "state.json")) as sf:
                        state = json.load(sf)
                    with open(os.path.join(run_dir, "config.yaml")) as cf:
                        config_yaml = cf.read()
                except OSError:
                    continue   # its output dir is gone
                run = Run(run_id=state["run_id"], config_yaml=config_yaml, output_dir=state["output_dir"],
                          total_steps=state["total_steps"], state=state["state"], step=state["step"],
                          error=state["error"], created_at=state["created_at"], last_metrics=state["last_metrics"])
                metrics_path = os.path.join(run_dir, "metrics.jsonl")
                if os.path.exists(metrics_path):
                    with open(metrics_path) as mf:
                        for mline in mf:
                            m = json.loads(mline)
                            run.events.append({"state": cpb.RUNNING, "step": m.pop("step"), "metrics": m,
                                               "message": "", "time": 0.0})
                if run.state in TERMINAL:
                    run.events.append({"state": run.state, "step": run.step, "metrics": {}, "message": run.error,
                                       "time": time.time()})
                else:
                    self.interrupted.append(run)
                self.runs[run.run_id] = run

    def create(self, config_yaml: str, output_dir: str, total_steps: int, exp_name: str = "rlgrid") -> Run:
        """A new PENDING run, named `<exp_name>-<12 hex digits>` (exp_name is validated by the config)."""
        run = Run(run_id=f"{exp_name}-{uuid.uuid4().hex[:12]}", config_yaml=config_yaml,
                  output_dir=os.path.abspath(output_dir),
                  total_steps=total_steps)
        os.makedirs(run.run_dir, exist_ok=True)
        with open(os.path.join(run.run_dir, "config.yaml"), "w") as f:
            f.write(config_yaml)
        run.set_state(cpb.PENDING, "waiting for workers")
        with self.lock:
            self.runs[run.run_id] = run
            with open(self.index_path, "a") as f:
                f.write(json.dumps({"run_id": run.run_id, "output_dir": run.output_dir}) + "\n")
        return run

    def get(self, run_id: str) -> Run | None:
        with self.lock:
            return self.runs.get(run_id)

    def all(self) -> list[Run]:
        with self.lock:
            return sorted(self.runs.values(), key=lambda r: r.created_at)
