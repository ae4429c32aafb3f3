"""TensorBoard event files per run, under ``runs/<run_id>/tensorboard/``: every metric of every step and
evaluation as a scalar. Optional: written only when TensorBoard is installed
(``pip install rlgrid[tensorboard]``); metrics.jsonl is always written.

    tensorboard --logdir <runtime_args.output_dir>/runs
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

try:   # torch's writer needs the tensorboard package
    from torch.utils.tensorboard import SummaryWriter
except ImportError:
    SummaryWriter = None


def available() -> bool:
    return SummaryWriter is not None


class EventWriter:
    """Scalars of one run; flushed after every step, so a running TensorBoard sees each one."""

    def __init__(self, log_dir: str):
        self._writer = SummaryWriter(log_dir=log_dir)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_writer(log_dir: str) -> EventWriter | None:
    """An EventWriter for `log_dir`, or None when TensorBoard is not installed or the files cannot be made
    (the run goes on: its metrics are in metrics.jsonl either way)."""
    if SummaryWriter is None:
        return None
    try:
        return EventWriter(log_dir)
    except OSError as exc:
        log.warning("no TensorBoard events for %s: %s", log_dir, exc)
        return None
