"""A real task with a held-out split: GSM8K-format arithmetic and word problems, generated
deterministically (no data set download), as train and eval JSONL files.

    python -m services.coordinator.arithmetic OUT_DIR [--train 1000] [--eval 100] [--seed 0] [--max-number 10]

Each line is GSM8K's ``{"question": ..., "answer": "<working>\\n#### <number>"}`` plus a chat
``prompt`` (the question and the instruction to answer with the number, as one user message), which
:func:`services.coordinator.data.load_jsonl` reads first, so the model's chat template applies. The
``math`` reward scores the number after the response's last ``####`` (else its last number) against
the one after the answer's ``####``. Train and eval share no question.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Callable

INSTRUCTION = "Answer with only the number."
"""Appended to every question: the answer format the ``math`` reward reads first."""

NAMES = ["Tom", "Sara", "Ben", "Mia", "Leo", "Ana", "Sam", "Eva", "Max", "Lily", "Omar", "Zoe"]
ITEMS = ["apples", "books", "coins", "stickers", "marbles", "pencils", "cards", "shells", "cookies", "stamps"]


@dataclass(frozen=True)
class Problem:
    question: str
    working: str
    answer: int

    def record(self) -> dict:
        return {"prompt": [{"role": "user", "content": f"{self.question}\n{INSTRUCTION}"}],
                "question": self.question, "answer": f"{self.working}\n#### {self.answer}"}


def _add(r: random.Random, hi: int) -> Problem:
    a, b = r.randint(1, hi), r.randint(1, hi)
    return Problem(f"What is {a} + {b}?", f"{a} + {b} = {a + b}", a + b)


def _sub(r: random.Random, hi: int) -> Problem:
    a, b = sorted((r.randint(1, hi), r.randint(1, hi)), reverse=True)
    return Problem(f"What is {a} - {b}?", f"{a} - {b} = {a - b}", a - b)


def _gain(r: random.Random, hi: int) -> Problem:
    name, item, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(2, hi), r.randint(2, hi)
    return Problem(f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?",
                   f"{name} has {a} + {b} = {a + b} {item}.", a + b)


def _loss(r: random.Random, hi: int) -> Problem:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = sorted((r.randint(2, hi), r.randint(1, hi - 1)), reverse=True)
    return Problem(f"{name} has {a} {item} and gives away {b} of them. How many {item} does {name} have left?",
                   f"{name} has {a} - {b} = {a - b} {item} left.", a - b)


def _groups(r: random.Random, hi: int) -> Problem:
    item, a, b = r.choice(ITEMS), r.randint(2, min(hi, 9)), r.randint(2, min(hi, 9))
    return Problem(f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?",
                   f"{a} x {b} = {a * b} {item}.", a * b)


KINDS: dict[str, Callable[[random.Random, int], Problem]] = {
    "add": _add, "sub": _sub, "gain": _gain, "loss": _loss, "groups": _groups}
"""Problem kinds, drawn in turn: sums and differences, bare and as word problems, and products."""


def generate(n: int, *, seed: int, max_number: int, kinds: tuple[str, ...] = tuple(KINDS),
             exclude: set[str] = frozenset()) -> list[Problem]:
    """`n` distinct problems (none of whose questions is in `exclude`), a deterministic function of the
    arguments; numbers are at most `max_number`."""
    if max_number < 3:
        raise ValueError(f"--max-number must be >= 3, got {max_number}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown problem kinds {unknown}; choose from {', '.join(KINDS)}")
    r = random.Random(seed)
    seen, out = set(exclude), []
    for attempt in range(200 * n):
        if len(out) == n:
            break
        p = KINDS[kinds[attempt % len(kinds)]](r, max_number)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct problems with --max-number {max_number}; raise it or ask for fewer")
    return out


def write_split(out_dir: str, *, train: int, eval: int, seed: int = 0, max_number: int = 10) -> tuple[str, str]:
    """Writes `out_dir`/train.jsonl and `out_dir`/eval.jsonl (disjoint questions); returns their paths.
    The eval split is drawn first, from its own seed, so it does not change with `train`."""
    held_out = generate(eval, seed=seed * 2 + 1, max_number=max_number)
    training = generate(train, seed=seed * 2, max_number=max_number, exclude={p.question for p in held_out})
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, problems in (("train", training), ("eval", held_out)):
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p.record()) + "\n" for p in problems)
        paths.append(path)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=1000, help="training problems")
    parser.add_argument("--eval", type=int, default=100, help="held-out problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-number", type=int, default=10, help="largest number in a problem")
    args = parser.parse_args(argv)
    try:
        train, held_out = write_split(args.out_dir, train=args.train, eval=args.eval, seed=args.seed,
                                      max_number=args.max_number)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {train} ({args.train} problems) and {held_out} ({args.eval} held-out problems)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
