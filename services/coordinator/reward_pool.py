"""Rewards scored in worker processes, each sample under a time limit (models.reward.timeout_s).

A reward is plain Python, and a model's output is hostile input to it. math-verify parses LaTeX with
sympy: `\\boxed{9^{9^{9^{9}}}}` makes it evaluate a power tower, which runs for minutes in C while
holding the GIL, so no thread of the coordinator could even notice. math-verify's own timeout is no
help: it uses signal.alarm, which works only in a process's main thread (the loop runs in another)
and cannot interrupt C code anyway. A process can be killed: each worker scores one sample at a time;
one over the limit is killed and replaced, and its sample scores 0 and is counted (reward/timeouts).

Workers are `python -m services.coordinator.reward_pool <name>`, speaking JSON lines on stdin/stdout.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from services.coordinator.rewards import get_reward

log = logging.getLogger(__name__)

_READY = "ready"
_START_TIMEOUT_S = 120.0   # a worker imports the reward's libraries (math-verify: sympy) before it is ready


class RewardError(RuntimeError):
    """A reward raised, or its worker process died; the message names the reward."""


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen
    task: int | None = None        # sample index it is scoring
    deadline: float = 0.0
    ready: bool = False
    started: float = field(default_factory=time.monotonic)

    def send(self, index: int, response: str, ground_truth: str, timeout_s: float) -> None:
        self.proc.stdin.write(json.dumps([index, response, ground_truth]) + "\n")
        self.proc.stdin.flush()
        self.task, self.deadline = index, time.monotonic() + timeout_s

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class RewardPool:
    """Scores (response, ground truth) pairs with the reward `name` in `workers` processes."""

    def __init__(self, name: str, *, timeout_s: float, workers: int):
        get_reward(name)   # an unknown name is refused here, naming models.reward.name
        self.name, self.timeout_s = name, timeout_s
        self._selector = selectors.DefaultSelector()
        self._workers = [self._start() for _ in range(workers)]
        self.timeouts = 0   # samples over the limit, over the pool's life
        log.info(self.describe())

    def describe(self) -> str:
        return (f"rewards: '{self.name}' in {len(self._workers)} worker processes, each sample limited to "
                f"models.reward.timeout_s={self.timeout_s:g} s (a sample over it scores 0, counted in "
                f"reward/timeouts); math-verify's own timeout is off here: it uses signal.alarm, which works "
                f"only in a process's main thread and cannot interrupt C code holding the GIL")

    def _start(self) -> _Worker:
        proc = subprocess.Popen([sys.executable, "-m", __name__, self.name], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, bufsize=1, env={**os.environ, "OMP_NUM_THREADS": "1"})
        worker = _Worker(proc)
        self._selector.register(proc.stdout, selectors.EVENT_READ, worker)
        return worker

    def _replace(self, worker: _Worker) -> None:
        self._selector.unregister(worker.proc.stdout)
        worker.kill()
        self._workers[self._workers.index(worker)] = self._start()

    def score(self, pairs: list[tuple[str, str]]) -> tuple[list[float], int]:
        """Scores in the order given; returns (scores, how many timed out and scored 0)."""
        scores = [0.0] * len(pairs)
        pending, timeouts = deque(range(len(pairs))), 0
        while pending or any(w.task is not None for w in self._workers):
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    i = pending.popleft()
                    w.send(i, *pairs[i], self.timeout_s)
            now = time.monotonic()
            waits = [w.deadline - now for w in self._workers if w.task is not None]
            waits += [w.started + _START_TIMEOUT_S - now for w in self._workers if not w.ready]
            for key, _ in self._selector.select(timeout=max(0.0, min(waits, default=1.0))):
                w = key.data
                line = w.proc.stdout.readline()
                if not line:   # EOF: the worker died
                    raise RewardError(f"a worker process of reward '{self.name}' exited with code "
                                      f"{w.proc.wait()} while scoring; see the coordinator's log")
                message = json.loads(line)
                if message == _READY:
                    w.ready = True
                    continue
                index, value, error = message
                if error is not None:
                    raise RewardError(f"reward '{self.name}' (models.reward.name) raised on a sample: {error}")
                scores[index], w.task = float(value), None
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now >= w.deadline:
                    timeouts += 1   # scores[w.task] stays 0
                    self._replace(w)
                elif not w.ready and now >= w.started + _START_TIMEOUT_S:
                    raise RewardError(f"a worker process of reward '{self.name}' did not start within "
                                      f"{_START_TIMEOUT_S:g} s")
        self.timeouts += timeouts
        return scores, timeouts

    def close(self) -> None:
        for w in self._workers:
            self._selector.unregister(w.proc.stdout)
            w.proc.stdin.close()   # a waiting worker exits at EOF; a busy one is killed
            try:
                w.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                w.kill()
        self._selector.close()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(name: str) -> None:
    """A worker: reads [index, response, ground_truth] lines, writes [index, score, error] lines."""
    reward = get_reward(name)
    out = sys.stdout
    out.write(json.dumps(_READY) + "\n")
    out.flush()
    for line in sys.stdin:
        index, response, ground_truth = json.loads(line)
        try:
            reply = [index, float(reward(response, ground_truth)), None]
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which fails the step
            reply = [index, None, f"{type(exc).__name__}: {exc}"]
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve(sys.argv[1])
