"""Held-out evaluation: its metrics, when it runs, and where its results go (metrics.jsonl, GetRun's
last_metrics, WatchRun's events, a restarted coordinator, TensorBoard, the plot)."""
import json
import os

import pytest

from rlgrid.v1 import coordinator_pb2 as cpb
from services.coordinator import tensorboard_events
from services.coordinator.evaluation import answer_metrics, is_due
from services.coordinator.plot import PANELS, figure, read_metrics
from services.coordinator.runs import RunStore


def test_answer_metrics():
    m = answer_metrics([1.0, 0.0, 0.5, 1.0], [4, 10, 6, 8], [False, True, False, False], prefix="")
    assert m["eval/accuracy"] == 0.5                # partial credit (0.5) is not a correct answer
    assert m["eval/reward_mean"] == pytest.approx(0.625)
    assert m["eval/response_length"] == 7.0
    assert m["eval/truncated_frac"] == 0.25
    sampled = answer_metrics([0.0, 1.0], [1, 2], [False, False], prefix="sampled/")
    assert sampled == {"eval/sampled/accuracy": 0.5, "eval/sampled/reward_mean": 0.5,
                       "eval/sampled/response_length": 1.5, "eval/sampled/truncated_frac": 0.0}
    with pytest.raises(ValueError):
        answer_metrics([], [], [], prefix="")
    with pytest.raises(ValueError):
        answer_metrics([1.0], [1, 2], [False], prefix="")


@pytest.mark.parametrize("first,last,interval,expected", [
    (0, 10, 4, [0, 4, 8, 10]),
    (0, 10, 0, [0, 10]),          # 0: before the first and after the last step only
    (0, 10, 5, [0, 5, 10]),
    (5, 10, 4, [5, 8, 10]),       # a resumed run starts with an evaluation at its first step
    (0, 3, 10, [0, 3]),
])
def test_schedule(first, last, interval, expected):
    assert [s for s in range(first, last + 1) if is_due(s, first=first, last=last, interval=interval)] == expected


def _eval_metrics(acc: float) -> dict:
    return {"eval/accuracy": acc, "eval/reward_mean": acc, "eval/response_length": 5.0, "eval/truncated_frac": 0.0,
            "eval/sampled/accuracy": acc / 2, "eval/prompts": 4.0, "time/eval": 0.1}


def _step_metrics(reward: float) -> dict:
    return {"reward/mean": reward, "response_length/mean": 7.0, "train/kl": 0.01, "train/entropy": 1.5,
            "train/clip_frac": 0.02, "time/step": 1.0}


def _recorded_run(tmp_path):
    store = RunStore(str(tmp_path / "state"))
    run = store.create("runtime_args: {}\n", str(tmp_path / "out"), total_steps=2, exp_name="my-exp")
    samples = [{"index": i, "mode": "greedy", "response": f"{i}", "reward": float(i % 2), "tokens": 1,
                "truncated": False} for i in range(4)]
    run.record_eval(0, _eval_metrics(0.25), samples)
    run.record_step(1, _step_metrics(0.1))
    run.record_step(2, _step_metrics(0.3))
    run.record_eval(2, _eval_metrics(0.75), samples)
    run.set_state(cpb.FINISHED, "done")
    return store, run


def test_a_rollback_keeps_the_evaluations_up_to_its_episode_and_drops_later_ones(tmp_path):
    """A restart resumes the run at episode 1: the evaluation at step 0 stays (and is not redone), the
    one after step 2 leaves with step 2's records, so the redone step 2 evaluates again."""
    _, run = _recorded_run(tmp_path)
    assert run.evaluated(0) and run.evaluated(2) and not run.evaluated(1)
    run.rollback(1, "resumed from checkpoint-1")
    assert run.evaluated(0) and not run.evaluated(2)
    rows = read_metrics(os.path.join(run.run_dir, "metrics.jsonl"))
    assert [(r["step"], "eval/accuracy" in r) for r in rows] == [(0, True), (1, False)]


def test_eval_results_reach_metrics_getrun_and_watchrun(tmp_path):
    store, run = _recorded_run(tmp_path)
    assert run.run_id.startswith("my-exp-")          # runtime_args.exp_name names the run and its directory
    assert os.path.basename(run.run_dir) == run.run_id
    rows = read_metrics(os.path.join(run.run_dir, "metrics.jsonl"))
    assert [(r["step"], "eval/accuracy" in r) for r in rows] == [(0, True), (1, False), (2, False), (2, True)]
    with open(os.path.join(run.run_dir, "eval", "step-2.jsonl")) as f:
        assert [json.loads(line)["index"] for line in f] == [0, 1, 2, 3]
    # GetRun: the latest value of every metric, the last evaluation's included after later steps
    info = run.to_proto()
    assert info.last_metrics["eval/accuracy"] == 0.75 and info.last_metrics["reward/mean"] == 0.3
    # WatchRun's events: each evaluation is an event with its metrics and its step
    evals = [e for e in run.events if "eval/accuracy" in e["metrics"]]
    assert [(e["step"], e["metrics"]["eval/accuracy"]) for e in evals] == [(0, 0.25), (2, 0.75)]
    assert "accuracy 0.750" in evals[-1]["message"]
    # a restarted coordinator replays them
    replayed = RunStore(store.state_dir).get(run.run_id)
    assert [(e["step"], e["metrics"]["eval/accuracy"]) for e in replayed.events
            if "eval/accuracy" in e["metrics"]] == [(0, 0.25), (2, 0.75)]
    assert replayed.to_proto().last_metrics["eval/accuracy"] == 0.75


def test_plot_has_eval_kl_entropy_and_clip_panels(tmp_path):
    _, run = _recorded_run(tmp_path)
    fig = figure(read_metrics(os.path.join(run.run_dir, "metrics.jsonl")), "t")
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert {"held-out accuracy", "KL to reference", "entropy", "clip fraction"} <= set(panels)
    greedy, sampled = panels["held-out accuracy"].get_lines()
    assert list(greedy.get_xdata()) == [0, 2] and list(greedy.get_ydata()) == [0.25, 0.75]
    assert list(sampled.get_ydata()) == [0.125, 0.375]
    assert list(panels["clip fraction"].get_lines()[0].get_xdata()) == [1, 2]
    assert len(PANELS) == len(fig.axes)


def test_plot_without_evaluation_says_so(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, **_step_metrics(0.1)}) + "\n" for s in (1, 2)))
    fig = figure(read_metrics(str(path)), "t")
    ax = next(a for a in fig.axes if a.get_title() == "held-out accuracy")
    assert not ax.get_lines() and "eval_data_path" in ax.texts[0].get_text()


@pytest.mark.skipif(not tensorboard_events.available(), reason="pip install rlgrid[tensorboard]")
def test_tensorboard_events_hold_every_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, run = _recorded_run(tmp_path)
    acc = EventAccumulator(os.path.join(run.run_dir, "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/accuracy")] == [(0, 0.25), (2, 0.75)]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("reward/mean")] == [(1, 0.1), (2, 0.3)]
    assert {"train/kl", "train/entropy", "train/clip_frac"} <= set(acc.Tags()["scalars"])


def test_no_tensorboard_no_event_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard_events, "SummaryWriter", None)   # as without the package
    _, run = _recorded_run(tmp_path)
    assert not os.path.exists(os.path.join(run.run_dir, "tensorboard"))
    assert len(read_metrics(os.path.join(run.run_dir, "metrics.jsonl"))) == 4
