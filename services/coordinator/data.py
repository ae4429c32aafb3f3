"""Prompt data for the coordinator: JSONL loading, episode sampling and the toy task.

:func:`load_jsonl` reads one record per line in any of these common layouts:

* ``{"prompt": str | messages, "ground_truth": ...}``
* ``{"prompt": ..., "answer": ...}``
* GSM8K ``{"question": ..., "answer": "... #### 42"}`` (the full answer is kept;
  the ``math`` reward extracts the final number)
* MATH ``{"problem": ..., "solution": "... \\boxed{42}"}``
* verl / ChatLearn ``{"prompt": [messages], "reward_model": {"ground_truth": ...}}``
* ``{"query": ..., "solution" | "response": ...}``
* chat ``{"messages": [...]}``; a trailing assistant message is always removed
  from the prompt and serves as the ground truth when no ground-truth field is
  present.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

Messages = list[dict[str, str]]

PROMPT_KEYS = ("prompt", "messages", "question", "problem", "query")
"""Fields tried, in order, for the prompt."""

GROUND_TRUTH_KEYS = ("ground_truth", "reward_model.ground_truth", "answer", "solution", "response")
"""Fields tried, in order, for the ground truth (dotted names are nested)."""

TOY_ALPHABET: list[str] = list("abcdefghijkl")
"""The words of the toy echo task."""


@dataclass
class PromptRecord:
    """One prompt with its reference answer."""

    prompt: str | Messages
    """Plain text or chat messages ``[{"role": ..., "content": ...}]``."""
    ground_truth: str
    index: int
    """0-based position of the record in its file."""


def _lookup(obj: dict[str, Any], dotted: str) -> Any:
    """``obj["a"]["b"]`` for ``"a.b"``; ``None`` when any level is missing."""
    value: Any = obj
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _first_present(obj: dict[str, Any], keys: Sequence[str]) -> Any:
    """Value of the first key in ``keys`` that is present and not null."""
    for key in keys:
        value = _lookup(obj, key)
        if value is not None:
            return value
    return None


def _is_messages(value: Any) -> bool:
    """True for a non-empty list of ``{"role": str, "content": str}`` dicts."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )


def _parse_record(obj: Any, index: int) -> PromptRecord:
    """Build a record from one decoded JSON line; raises ValueError with the reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")

    prompt = _first_present(obj, PROMPT_KEYS)
    if prompt is None:
        raise ValueError(f"no prompt field (expected one of {', '.join(PROMPT_KEYS)})")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty prompt")
    elif not _is_messages(prompt):
        raise ValueError(
            'prompt must be a string or a non-empty list of {"role": str, "content": str} messages'
        )

    ground_truth = _first_present(obj, GROUND_TRUTH_KEYS)
    if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
        if ground_truth is None:
            ground_truth = prompt[-1]["content"]
        prompt = prompt[:-1]
        if not prompt:
            raise ValueError("messages contain only an assistant reply, no prompt")
    if ground_truth is None:
        raise ValueError(
            f"no ground truth field (expected one of {', '.join(GROUND_TRUTH_KEYS)})"
        )
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float)):
        raise ValueError(
            f"ground truth must be a string or a number, got {type(ground_truth).__name__}"
        )
    return PromptRecord(prompt=prompt, ground_truth=str(ground_truth), index=index)


def load_jsonl(path: str, key: str = "runtime_args.data_path") -> list[PromptRecord]:
    """Load prompt records from a JSONL file (formats: see the module docstring).

    Blank lines are skipped; ``index`` counts records, not lines. ``key`` is the config key that
    named the file, for the error messages.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not valid JSON or lacks a prompt / ground truth
            (the message names the file and 1-based line number), or the file
            holds no records.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: no such file {path!r}")
    records: list[PromptRecord] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no}: invalid JSON ({e.msg})") from None
            try:
                records.append(_parse_record(obj, index=len(records)))
            except ValueError as e:
                raise ValueError(f"{path} line {line_no}: {e}") from None
    if not records:
        raise ValueError(f"{key}: {path!r} contains no records")
    return records


class PromptSampler:
    """Deterministic episode batches over the records.

    Shuffled per epoch with the seed when shuffle is on; resumable from ``position``.

    Epoch ``e`` visits every record exactly once, in the order given by
    ``random.Random(seed + e)`` (or file order when ``shuffle`` is off).
    Batches run across epoch boundaries, so the stream depends only on
    ``(records, seed, shuffle)`` and the number of records consumed.
    """

    def __init__(
        self,
        records: Sequence[PromptRecord],
        prompts_per_episode: int,
        *,
        seed: int,
        shuffle: bool,
        position: int = 0,
    ) -> None:
        if not records:
            raise ValueError("PromptSampler needs at least one record")
        if prompts_per_episode < 1:
            raise ValueError(f"prompts_per_episode must be >= 1, got {prompts_per_episode}")
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self._records = list(records)
        self._prompts_per_episode = prompts_per_episode
        self._seed = seed
        self._shuffle = shuffle
        self._position = position
        self._epoch = -1
        self._order: list[int] = []

    def _epoch_order(self, epoch: int) -> list[int]:
        """Record indices in the order epoch ``epoch`` visits them (cached)."""
        if epoch != self._epoch:
            order = list(range(len(self._records)))
            if self._shuffle:
                random.Random(self._seed + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def next_batch(self) -> list[PromptRecord]:
        """Return the next ``prompts_per_episode`` records, wrapping into the next epoch."""
        batch = []
        for _ in range(self._prompts_per_episode):
            epoch, offset = divmod(self._position, len(self._records))
            batch.append(self._records[self._epoch_order(epoch)[offset]])
            self._position += 1
        return batch

    @property
    def position(self) -> int:
        """Number of records consumed so far (store it in checkpoints)."""
        return self._position


def make_toy_dataset(path: str, n: int = 256, seed: int = 0) -> str:
    """Write ``n`` toy echo records ``{"prompt": "echo c", "ground_truth": "c"}`` to ``path``.

    The words are balanced over :data:`TOY_ALPHABET` and shuffled with ``seed``,
    so the file is a deterministic function of ``(n, seed)``. Parent
    directories are created. Returns ``path``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    words = [TOY_ALPHABET[i % len(TOY_ALPHABET)] for i in range(n)]
    random.Random(seed).shuffle(words)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for word in words:
            f.write(json.dumps({"prompt": f"echo {word}", "ground_truth": word}) + "\n")
    return path


def toy_vocabulary() -> list[str]:
    """Every word the toy prompts and ideal responses use, for training a tokenizer."""
    return ["echo", *TOY_ALPHABET]
