"""Test-only fault points: a test makes a service die, hang or pause at an exact point of a call.

Off unless the service was started with RLGRID_TEST_FAULT_DIR set (no deployment sets it; then
`point()` returns at once and touches no file). With it set, `point(name)` looks for a file named
`name` in that directory, written by the test (one per armed point, so a test arms a point while the
service runs, at the moment it chooses). Its text is `<action> [<nth>]`: act the nth time the point is
reached after arming (default 1), then delete the file. Actions:

- kill: SIGKILL this process (a crash inside the call: no reply, connections reset);
- hang: block the call until the process is killed or the test writes `<name>.release`;
- pause: write `<name>.reached`, block until the test writes `<name>.release`, then go on.

`pause` lets a test act (kill another service, cut a link) while this call is provably in flight.
Points: rollout `setup`, `generate` (after the first sample is sent), `prepare` (PrepareWeightSync,
before joining the group), `receive`, `commit`, `info`; trainer `train`, `logprobs`, `send`, `save`.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

FAULT_DIR_ENV = "RLGRID_TEST_FAULT_DIR"
_DIR = os.environ.get(FAULT_DIR_ENV) or None
_lock = threading.Lock()
_seen: dict[str, int] = {}   # armed point -> times reached since it was armed


def point(name: str) -> None:
    """A fault point; a no-op unless RLGRID_TEST_FAULT_DIR is set and `name` is armed there."""
    if _DIR is None:
        return
    path = os.path.join(_DIR, name)
    with _lock:
        try:
            with open(path) as f:
                words = f.read().split()
        except OSError:
            return
        action, nth = (words[0] if words else ""), (int(words[1]) if len(words) > 1 else 1)
        _seen[name] = _seen.get(name, 0) + 1
        if _seen[name] < nth:
            return
        _seen.pop(name)
        os.remove(path)
    log.warning("test fault point %s: %s", name, action)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "pause":
        with open(path + ".reached", "w"):
            pass
        _wait_for(path + ".release")
    elif action == "hang":
        _wait_for(path + ".release")
    else:
        log.error("test fault point %s: unknown action %r (kill, hang or pause)", name, action)


def _wait_for(release: str) -> None:
    while not os.path.exists(release):
        time.sleep(0.05)
    os.remove(release)
