"""Rewards in worker processes under a per-sample time limit, with a real pathological model output."""
from __future__ import annotations

import time

import pytest

from services.coordinator.reward_pool import RewardPool

# sympy evaluates the power tower in C, holding the GIL, for minutes: no thread can interrupt it
PATHOLOGICAL = r"so the answer is \boxed{9^{9^{9^{9}}}}"


def test_a_pathological_output_times_out_scores_zero_and_is_counted():
    with RewardPool("math", timeout_s=3, workers=2) as pool:
        pairs = [("#### 72", "72"), (PATHOLOGICAL, "1"), (r"\boxed{\frac{1}{2}}", "0.5"), ("7", "8")] * 2
        start = time.monotonic()
        scores, timeouts = pool.score(pairs)
        elapsed = time.monotonic() - start
        assert scores == [1.0, 0.0, 1.0, 0.0] * 2
        assert timeouts == 2 and pool.timeouts == 2
        # each stuck sample costs about the limit, on its own worker; the others go on meanwhile
        assert elapsed < 2 * 3 + 30, elapsed
        killed = [w.proc for w in pool._workers]
        # the replaced workers score again
        assert pool.score([("the answer is 12", "12"), ("x", "y")]) == ([1.0, 0.0], 0)
        assert "math-verify's own timeout is off" in pool.describe() and "models.reward.timeout_s=3" in pool.describe()
    assert all(p.poll() is not None for p in killed), "close() ends every worker"


def test_toy_reward_in_the_pool_matches_the_function():
    from services.coordinator.rewards import toy_echo_reward
    pairs = [("a a a a a a a a", "a"), ("a b a", "a"), ("", "a")]
    with RewardPool("toy_echo", timeout_s=10, workers=1) as pool:
        assert pool.score(pairs) == ([toy_echo_reward(*p) for p in pairs], 0)


def test_unknown_reward_is_refused_before_any_worker_starts():
    with pytest.raises(ValueError, match="models.reward.name"):
        RewardPool("nope", timeout_s=1, workers=1)
