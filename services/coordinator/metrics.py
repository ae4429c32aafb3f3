"""Prometheus metrics of the runs (served with --metrics-port)."""
from __future__ import annotations

import re

from prometheus_client import Gauge, start_http_server

from services.coordinator.runs import Run

STEP_METRIC = Gauge("rlgrid_step_metric", "Latest value of a run's step metric", ["run_id", "name"])
RUN_STEP = Gauge("rlgrid_run_step", "Steps finished by a run", ["run_id"])


def _name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def observe(run: Run, step: int, values: dict[str, float]) -> None:
    """A Run listener: mirrors each recorded step into the gauges."""
    RUN_STEP.labels(run.run_id).set(step)
    for k, v in values.items():
        STEP_METRIC.labels(run.run_id, _name(k)).set(v)


def serve(port: int, host: str = "localhost") -> None:
    """Serves /metrics on host:port (the coordinator's --host: loopback unless told otherwise)."""
    start_http_server(port, addr=host)
