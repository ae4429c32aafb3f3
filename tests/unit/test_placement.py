"""Placement as a policy: the decision from the GPUs the services report, and the order in which the
colocated hooks hand memory over around each phase, checked through the calls they make
(tests/integration/test_memory_handover.py runs them against the services' RPCs)."""
from __future__ import annotations

import pytest

from services.coordinator.clients import StepError
from services.coordinator.placement import Colocated, NoActions, Placement, decide


@pytest.mark.parametrize(("placement", "ahead", "trainer", "replicas", "expected"), [
    ("auto", 0, [], [[], []], "disaggregated"),                     # CPU: nothing is shared
    ("auto", 0, ["GPU-a"], [["GPU-b"], ["GPU-c"]], "disaggregated"),
    ("auto", 0, ["GPU-a"], [["GPU-b"], ["GPU-a"]], "colocated"),    # one replica shares the trainer's GPU
    ("auto", 1, ["GPU-a"], [["GPU-a"]], "disaggregated"),           # overlap: both keep their memory
    ("disaggregated", 0, ["GPU-a"], [["GPU-a"]], "disaggregated"),
    ("colocated", 0, ["GPU-a", "GPU-b"], [["GPU-b"]], "colocated"),
])
def test_decision_from_gpu_uuids(placement, ahead, trainer, replicas, expected):
    kind, why = decide(placement, ahead, trainer, replicas)
    assert kind == expected and f"runtime_args.placement={placement}" in why


def test_colocated_without_a_shared_gpu_is_refused_naming_the_key():
    with pytest.raises(StepError, match="runtime_args.placement=colocated.*share no GPU"):
        decide("colocated", 0, [], [[]])


class Recorder:
    """PlacementActions that write down what they were asked, in order."""

    def __init__(self):
        self.calls: list[str] = []

    def sleep_rollouts(self):
        self.calls.append("sleep")

    def wake_rollouts(self, tags):
        self.calls.append("wake:" + ",".join(tags))

    def offload_trainer(self):
        self.calls.append("offload")

    def onload_trainer(self):
        self.calls.append("onload")


def _step(placement: Placement, log: list[str]) -> None:
    """One step as loop.py runs it: rollout, the trainer's work, the weight sync."""
    with placement.rollout():
        log.append("generate")
    with placement.train():
        log.append("train")
    with placement.sync():
        log.append("sync")


def test_colocated_hands_memory_over_around_each_phase():
    actions = Recorder()
    _step(Colocated(actions, "test"), actions.calls)
    assert actions.calls == ["offload", "wake:kv_cache", "generate", "sleep", "onload", "train", "wake:weights", "sync"]


def test_disaggregated_hooks_do_nothing():
    actions = Recorder()
    _step(Placement(actions, "test"), actions.calls)
    assert actions.calls == ["generate", "train", "sync"]
    stand_in = Colocated(NoActions(), "shared GPU")
    _step(stand_in, [])
    assert "no memory is handed over" in stand_in.describe()
    assert "no memory" not in Colocated(Recorder(), "shared GPU").describe()
