"""How the rollout and trainer sides spent a step's wall time: busy (the replicas generating, the
trainer computing, both in a weight sync) and waiting for each other. The loop and the rollout
producer record spans from their own threads; each step's report clips them to the step.

What is measured is time inside the services' calls as the coordinator sees them, not device
utilisation: a replica's Generate call counts as busy for as long as it streams.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

# rollout: replicas generating; trainer: trainer calls (agreement, proximal logprobs, Train,
# checkpoints); sync: a weight sync (both sides); *_wait: a side blocked on the other
KINDS = ("rollout", "trainer", "sync", "trainer_wait", "rollout_wait")


class Activity:
    """Spans of each kind of work, open and closed, recorded from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed: list[tuple[str, float, float]] = []
        self._open: dict[int, tuple[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, kind: str) -> Iterator[None]:
        if kind not in KINDS:
            raise ValueError(f"unknown activity {kind!r}; one of {KINDS}")
        token = object()
        with self._lock:
            self._open[id(token)] = (kind, time.perf_counter())
        try:
            yield
        finally:
            with self._lock:
                kind, start = self._open.pop(id(token))
                self._closed.append((kind, start, time.perf_counter()))

    def report(self, start: float, end: float) -> dict[str, float]:
        """The step [start, end]'s metrics; spans that ended before `start` are forgotten (they
        belong to earlier steps), spans still open count up to `end`."""
        with self._lock:
            self._closed = [s for s in self._closed if s[2] > start]
            spans = self._closed + [(kind, begin, end) for kind, begin in self._open.values()]
        covered = dict.fromkeys(KINDS, 0.0)
        for kind, begin, finish in spans:
            covered[kind] += max(0.0, min(finish, end) - max(begin, start))
        wall = max(end - start, 1e-9)
        return {"overlap/rollout_busy_frac": min(1.0, (covered["rollout"] + covered["sync"]) / wall),
                "overlap/trainer_busy_frac": min(1.0, (covered["trainer"] + covered["sync"]) / wall),
                "overlap/trainer_wait_s": covered["trainer_wait"],
                # the producer is held during a sync too, which is work for the replicas, not waiting
                "overlap/rollout_wait_s": max(0.0, covered["rollout_wait"] - covered["sync"])}
