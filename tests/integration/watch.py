"""Helpers for tests that act on a service while a run goes on: a WatchRun follower in a thread, and
the test-only fault points of services/common/faults.py (arm one, wait until a call reaches it)."""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

import grpc

from rlgrid.v1 import coordinator_pb2 as cpb


class RunWatcher:
    """Follows WatchRun of one run in a thread; `events` grows as they arrive."""

    def __init__(self, stub, run_id: str, timeout: float = 1200.0):
        self.events: list[cpb.RunEvent] = []
        self.ended = False
        self.cond = threading.Condition()
        self._stream = stub.WatchRun(cpb.WatchRunRequest(run_id=run_id), timeout=timeout)
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        try:
            for e in self._stream:
                with self.cond:
                    self.events.append(e)
                    self.cond.notify_all()
        except grpc.RpcError:
            pass   # the coordinator went away (a test may kill it), or the deadline passed
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[cpb.RunEvent], bool], timeout: float = 300.0, start: int = 0,
                 what: str = "") -> int:
        """Index of the first event from `start` on that matches; fails on a FAILED event or the deadline."""
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.events):
                    e = self.events[i]
                    if predicate(e):
                        return i
                    assert e.state != cpb.FAILED, f"run failed while waiting for {what}: {self.describe()}"
                    i += 1
                left = deadline - time.monotonic()
                assert left > 0 and not self.ended, f"no event for {what} within {timeout} s; {self.describe()}"
                self.cond.wait(min(left, 1.0))

    def describe(self) -> str:
        """The run's messages so far (not its step records), for a failing assertion."""
        lines = [f"[{cpb.RunState.Name(e.state)} step {e.step}] {e.message}" for e in self.events
                 if e.message and not e.metrics]
        return "events:\n  " + "\n  ".join(lines[-60:])

    def step(self, n: int, **kw) -> int:
        """Index of the record of step `n` (the first one from `start`)."""
        return self.wait_for(lambda e: bool(e.metrics) and e.step == n, what=f"step {n}", **kw)

    def message(self, needle: str, **kw) -> int:
        return self.wait_for(lambda e: needle in e.message, what=repr(needle), **kw)

    def steps(self) -> dict[int, dict[str, float]]:
        """The last record of each step (a step redone after a restart counts once, as redone)."""
        with self.cond:
            return {e.step: dict(e.metrics) for e in self.events if e.metrics and e.state != cpb.FAILED}

    def close(self) -> None:
        self._stream.cancel()


def arm(fault_dir: str, point: str, action: str, nth: int = 1) -> None:
    """The nth call that reaches `point` from now on does `action` (kill, hang, pause)."""
    os.makedirs(fault_dir, exist_ok=True)
    for stale in (".reached", ".release"):
        if os.path.exists(os.path.join(fault_dir, point + stale)):
            os.remove(os.path.join(fault_dir, point + stale))
    with open(os.path.join(fault_dir, point + ".tmp"), "w") as f:
        f.write(f"{action} {nth}\n")
    os.replace(os.path.join(fault_dir, point + ".tmp"), os.path.join(fault_dir, point))


def reached(fault_dir: str, point: str, timeout: float = 300.0) -> None:
    """Blocks until a call paused at `point` (action `pause`)."""
    path = os.path.join(fault_dir, point + ".reached")
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"no call reached fault point {point} within {timeout} s"
        time.sleep(0.05)
    os.remove(path)


def release(fault_dir: str, point: str) -> None:
    with open(os.path.join(fault_dir, point + ".release"), "w"):
        pass


def fired(fault_dir: str, point: str) -> bool:
    """Whether the armed point has acted (its file is consumed)."""
    return not os.path.exists(os.path.join(fault_dir, point))
