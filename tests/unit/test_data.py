"""Tests for services.coordinator.data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.coordinator.data import (
    TOY_ALPHABET,
    PromptRecord,
    PromptSampler,
    load_jsonl,
    make_toy_dataset,
    toy_vocabulary,
)
from services.coordinator.rewards import TOY_ECHO_LENGTH, get_reward

USER_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
]


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def load_one(tmp_path: Path, row: dict[str, Any]) -> PromptRecord:
    records = load_jsonl(write_jsonl(tmp_path / "data.jsonl", [row]))
    assert len(records) == 1
    return records[0]


# --------------------------------------------------------------------------- load_jsonl formats


def test_prompt_ground_truth(tmp_path: Path) -> None:
    record = load_one(tmp_path, {"prompt": "echo c", "ground_truth": "c"})
    assert record == PromptRecord(prompt="echo c", ground_truth="c", index=0)


def test_prompt_answer_number_becomes_string(tmp_path: Path) -> None:
    record = load_one(tmp_path, {"prompt": "2+2?", "answer": 4})
    assert record.ground_truth == "4"
    assert load_one(tmp_path, {"prompt": "half?", "answer": 0.5}).ground_truth == "0.5"


def test_gsm8k_keeps_full_answer(tmp_path: Path) -> None:
    answer = "She has 3+4 = <<3+4=7>>7 apples.\n#### 7"
    record = load_one(tmp_path, {"question": "How many apples?", "answer": answer})
    assert record.prompt == "How many apples?"
    assert record.ground_truth == answer
    assert get_reward("math")("\\boxed{7}", record.ground_truth) == 1.0


def test_math_problem_solution(tmp_path: Path) -> None:
    record = load_one(tmp_path, {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac12}$."})
    assert record.prompt == "Half of 1?"
    assert record.ground_truth == "It is $\\boxed{\\frac12}$."


def test_verl_reward_model_ground_truth(tmp_path: Path) -> None:
    row = {
        "data_source": "openai/gsm8k",
        "prompt": USER_MESSAGES,
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "4"},
        "extra_info": {"split": "train", "index": 0},
    }
    record = load_one(tmp_path, row)
    assert record.prompt == USER_MESSAGES
    assert record.ground_truth == "4"


def test_explicit_ground_truth_takes_precedence(tmp_path: Path) -> None:
    row = {"prompt": "q", "ground_truth": "1", "reward_model": {"ground_truth": "2"}, "answer": "3"}
    assert load_one(tmp_path, row).ground_truth == "1"


@pytest.mark.parametrize("key", ["solution", "response"])
def test_query_with_solution_or_response(tmp_path: Path, key: str) -> None:
    record = load_one(tmp_path, {"query": "2+2?", key: "4"})
    assert record.prompt == "2+2?"
    assert record.ground_truth == "4"


def test_messages_with_ground_truth(tmp_path: Path) -> None:
    record = load_one(tmp_path, {"messages": USER_MESSAGES, "ground_truth": "4"})
    assert record.prompt == USER_MESSAGES
    assert record.ground_truth == "4"


def test_messages_trailing_assistant_becomes_ground_truth(tmp_path: Path) -> None:
    messages = [*USER_MESSAGES, {"role": "assistant", "content": "4"}]
    record = load_one(tmp_path, {"messages": messages})
    assert record.prompt == USER_MESSAGES
    assert record.ground_truth == "4"


def test_blank_lines_skipped_and_indices_count_records(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(
        '\n{"prompt": "a", "ground_truth": "1"}\n   \n{"prompt": "b", "ground_truth": "2"}\n\n',
        encoding="utf-8",
    )
    records = load_jsonl(str(path))
    assert [(r.prompt, r.ground_truth, r.index) for r in records] == [("a", "1", 0), ("b", "2", 1)]


# --------------------------------------------------------------------------- load_jsonl errors


def test_bad_line_names_file_line_and_missing_field(tmp_path: Path) -> None:
    rows: list[Any] = [{"prompt": f"p{i}", "ground_truth": str(i)} for i in range(6)]
    rows.append({"text": "oops", "ground_truth": "7"})
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(ValueError) as err:
        load_jsonl(path)
    message = str(err.value)
    assert message.startswith(f"{path} line 7: no prompt field")
    assert "prompt" in message and "question" in message and "query" in message


def test_line_number_counts_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "ground_truth": "1"}\n\n{"prompt": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 3: no ground truth field \(expected one of"):
        load_jsonl(str(path))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ('["prompt", "x"]', "expected a JSON object"),
        ('{"prompt": "  ", "ground_truth": "1"}', "empty prompt"),
        ('{"prompt": [{"role": "user"}], "ground_truth": "1"}', "prompt must be"),
        ('{"prompt": "q", "ground_truth": ["1"]}', "ground truth must be a string or a number"),
        (
            '{"messages": [{"role": "assistant", "content": "4"}]}',
            "messages contain only an assistant reply",
        ),
    ],
)
def test_malformed_lines(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"line 1: {reason}"):
        load_jsonl(str(path))


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="runtime_args.data_path"):
        load_jsonl(str(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="runtime_args.data_path"):
        load_jsonl(str(tmp_path / "nope.jsonl"))


# --------------------------------------------------------------------------- PromptSampler


def make_records(n: int) -> list[PromptRecord]:
    return [PromptRecord(prompt=f"p{i}", ground_truth=str(i), index=i) for i in range(n)]


def indices(batch: list[PromptRecord]) -> list[int]:
    return [r.index for r in batch]


def take(sampler: PromptSampler, batches: int) -> list[int]:
    return [i for _ in range(batches) for i in indices(sampler.next_batch())]


def test_sampler_same_seed_same_sequence() -> None:
    records = make_records(10)
    a = PromptSampler(records, 3, seed=7, shuffle=True)
    b = PromptSampler(records, 3, seed=7, shuffle=True)
    assert take(a, 10) == take(b, 10)


def test_sampler_seed_changes_order() -> None:
    records = make_records(20)
    a = PromptSampler(records, 20, seed=1, shuffle=True)
    b = PromptSampler(records, 20, seed=2, shuffle=True)
    assert take(a, 1) != take(b, 1)


def test_sampler_without_shuffle_is_file_order() -> None:
    sampler = PromptSampler(make_records(5), 3, seed=0, shuffle=False)
    assert take(sampler, 4) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


def test_sampler_epoch_covers_every_record_once_and_reshuffles() -> None:
    n = 12
    sampler = PromptSampler(make_records(n), 4, seed=3, shuffle=True)
    stream = take(sampler, 9)  # three epochs
    epochs = [stream[i * n : (i + 1) * n] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    assert stream[:n] != list(range(n))


def test_sampler_batch_straddles_epochs() -> None:
    n = 5
    sampler = PromptSampler(make_records(n), 3, seed=0, shuffle=True)
    stream = take(sampler, 10)  # 30 records = 6 epochs, batches cross boundaries
    for e in range(6):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))


def test_sampler_resume_from_position() -> None:
    records = make_records(7)
    original = PromptSampler(records, 3, seed=11, shuffle=True)
    take(original, 4)
    assert original.position == 12
    resumed = PromptSampler(records, 3, seed=11, shuffle=True, position=original.position)
    assert take(resumed, 6) == take(original, 6)
    assert resumed.position == original.position == 30


def test_sampler_resume_with_different_batch_size() -> None:
    records = make_records(7)
    reference = take(PromptSampler(records, 1, seed=5, shuffle=True), 20)
    resumed = PromptSampler(records, 4, seed=5, shuffle=True, position=4)
    assert take(resumed, 4) == reference[4:20]


def test_sampler_batch_larger_than_dataset() -> None:
    sampler = PromptSampler(make_records(3), 7, seed=0, shuffle=True)
    batch = indices(sampler.next_batch())
    assert len(batch) == 7
    assert sorted(batch[:3]) == sorted(batch[3:6]) == [0, 1, 2]


@pytest.mark.parametrize(
    ("records", "per_episode", "position"),
    [([], 1, 0), (make_records(2), 0, 0), (make_records(2), 1, -1)],
)
def test_sampler_rejects_bad_arguments(
    records: list[PromptRecord], per_episode: int, position: int
) -> None:
    with pytest.raises(ValueError):
        PromptSampler(records, per_episode, seed=0, shuffle=True, position=position)


# --------------------------------------------------------------------------- toy dataset


def test_toy_alphabet_and_vocabulary() -> None:
    assert TOY_ALPHABET == list("abcdefghijkl")
    assert toy_vocabulary() == ["echo", *TOY_ALPHABET]


def test_make_toy_dataset_is_deterministic(tmp_path: Path) -> None:
    a = make_toy_dataset(str(tmp_path / "a.jsonl"), n=50, seed=3)
    b = make_toy_dataset(str(tmp_path / "b.jsonl"), n=50, seed=3)
    c = make_toy_dataset(str(tmp_path / "c.jsonl"), n=50, seed=4)
    assert a == str(tmp_path / "a.jsonl")
    assert Path(a).read_bytes() == Path(b).read_bytes()
    assert Path(a).read_bytes() != Path(c).read_bytes()


def test_make_toy_dataset_records(tmp_path: Path) -> None:
    path = make_toy_dataset(str(tmp_path / "sub" / "toy.jsonl"))
    records = load_jsonl(path)
    assert len(records) == 256
    assert {r.ground_truth for r in records} == set(TOY_ALPHABET)
    vocabulary = set(toy_vocabulary())
    toy_echo = get_reward("toy_echo")
    for record in records:
        assert record.prompt == f"echo {record.ground_truth}"
        ideal = " ".join([record.ground_truth] * TOY_ECHO_LENGTH)
        assert set(f"{record.prompt} {ideal}".split()) <= vocabulary
        assert toy_echo(ideal, record.ground_truth) == 1.0
        assert toy_echo(record.prompt, record.ground_truth) == pytest.approx(1 / TOY_ECHO_LENGTH)


def test_make_toy_dataset_rejects_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_toy_dataset(str(tmp_path / "toy.jsonl"), n=0)
