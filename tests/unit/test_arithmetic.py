"""The arithmetic task: deterministic, GSM8K-format, disjoint splits, answers the math reward accepts."""
import json
import re

import pytest

from services.coordinator.arithmetic import INSTRUCTION, KINDS, generate, write_split
from services.coordinator.data import load_jsonl
from services.coordinator.rewards import math_reward


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_split_is_deterministic_disjoint_and_gsm8k_shaped(tmp_path):
    train, held_out = write_split(str(tmp_path / "a"), train=300, eval=60, seed=3, max_number=10)
    again, _ = write_split(str(tmp_path / "b"), train=300, eval=60, seed=3, max_number=10)
    assert open(train).read() == open(again).read()
    rows, evals = _lines(train), _lines(held_out)
    assert len(rows) == 300 and len(evals) == 60
    assert not {r["question"] for r in rows} & {r["question"] for r in evals}
    # the held-out split does not depend on how many training problems were asked for
    _, other = write_split(str(tmp_path / "c"), train=50, eval=60, seed=3, max_number=10)
    assert _lines(other) == evals
    for r in rows + evals:
        assert r["prompt"] == [{"role": "user", "content": f"{r['question']}\n{INSTRUCTION}"}]
        working, answer = r["answer"].split("\n#### ")
        numbers = [int(n) for n in re.findall(r"\d+", r["question"])]
        assert max(numbers) <= 10 and int(answer) >= 0
        expr = re.search(r"(\d+) ([+\-x]) (\d+) = (\d+)", working)   # the working computes the answer
        a, op, b, c = int(expr[1]), expr[2], int(expr[3]), int(expr[4])
        assert c == int(answer) == {"+": a + b, "-": a - b, "x": a * b}[op]
    records = load_jsonl(train)   # the chat prompt is read first; the ground truth is the GSM8K answer
    assert isinstance(records[0].prompt, list) and records[0].ground_truth == rows[0]["answer"]
    assert math_reward(f"The answer is {rows[0]['answer'].rsplit(' ', 1)[-1]}.", records[0].ground_truth) == 1.0
    assert math_reward("I do not know", records[0].ground_truth) == 0.0


def test_every_kind_appears_and_bad_arguments_are_refused():
    problems = generate(50, seed=0, max_number=10)
    assert {p.question.split()[0] for p in problems[: len(KINDS)]} >= {"What", "There"}
    with pytest.raises(ValueError, match="--max-number"):
        generate(5, seed=0, max_number=2)
    with pytest.raises(ValueError, match="unknown problem kinds"):
        generate(5, seed=0, max_number=10, kinds=("div",))
    with pytest.raises(ValueError, match="distinct problems"):
        generate(10_000, seed=0, max_number=3, kinds=("add",))
