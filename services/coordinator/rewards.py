"""Reward functions for GRPO, looked up by name (``models.reward.name``).

A reward maps ``(response_text, ground_truth)`` to a float. Rewards are
registered with :func:`register_reward` and fetched with :func:`get_reward`.

Shipped rewards:

* ``toy_echo`` -- the demo task: the prompt ``echo <w>`` should be answered by
  repeating ``<w>``; partial credit per correct word among the first
  :data:`TOY_ECHO_LENGTH` words.
* ``math`` -- final-answer match (``\\boxed{}``, GSM8K ``####`` or last number),
  compared with ``math_verify`` when it is installed.
"""

from __future__ import annotations

import difflib
import re
from typing import Callable

try:
    from math_verify import parse as _mv_parse
    from math_verify import verify as _mv_verify

    _HAS_MATH_VERIFY = True
except ImportError:  # pragma: no cover - depends on the environment
    _HAS_MATH_VERIFY = False

RewardFn = Callable[[str, str], float]
"""``(response_text, ground_truth) -> reward``."""

TOY_ECHO_LENGTH = 8
"""Number of leading response words scored by ``toy_echo``; the ideal response
repeats the ground-truth word this many times."""

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Return a decorator that registers a reward function under ``name``.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def reward_names() -> list[str]:
    """Return the registered reward names, sorted."""
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFn:
    """Return the reward registered under ``name``.

    Raises:
        ValueError: for an unknown name; the message names the config key
            ``models.reward.name``, lists the registered rewards and suggests
            the closest one.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        names = reward_names()
        closest = difflib.get_close_matches(str(name), names, n=1, cutoff=0.0)
        hint = f"; did you mean {closest[0]!r}?" if closest else ""
        raise ValueError(
            f"unknown reward {name!r} in models.reward.name; "
            f"registered rewards: {', '.join(names) or '(none)'}{hint}"
        ) from None


# --------------------------------------------------------------------------- #
# toy_echo
# --------------------------------------------------------------------------- #


@register_reward("toy_echo")
def toy_echo_reward(response: str, ground_truth: str) -> float:
    """Fraction of the first ``TOY_ECHO_LENGTH`` response words equal to ``ground_truth``.

    Returns a value in ``[0, 1]``; 1.0 only for ``ground_truth`` repeated
    (at least) ``TOY_ECHO_LENGTH`` times. Words beyond the first
    ``TOY_ECHO_LENGTH`` are ignored. Non-string input scores 0.0.
    """
    if not isinstance(response, str) or not isinstance(ground_truth, str):
        return 0.0
    target = ground_truth.strip()
    words = response.split()[:TOY_ECHO_LENGTH]
    return sum(word == target for word in words) / TOY_ECHO_LENGTH


# --------------------------------------------------------------------------- #
# math
# --------------------------------------------------------------------------- #

# A number, optionally negative, optionally with thousands separators and decimals.
# The look-behind keeps "5-10" from yielding "-10".
_NUMBER_RE = re.compile(r"(?<!\d)-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_THOUSANDS_COMMA_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TRAILING_ZERO_DECIMAL_RE = re.compile(r"^(-?\d+)\.0+$")


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in ``text`` (nested braces allowed).

    An unbalanced (e.g. truncated) or brace-less ``\\boxed`` is skipped in
    favour of the previous one. An earlier ``\\boxed{`` cannot close after an
    unclosed later one starts, so each scan stops there: linear time even on
    degenerate output that repeats ``\\boxed{`` many times.
    """
    limit = len(text)
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < limit and text[i].isspace():
            i += 1
        if i < limit and text[i] == "{":
            depth = 0
            for j in range(i, limit):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
            limit = start
        start = text.rfind("\\boxed", 0, start)
    return None


def _after_last_hashes(text: str) -> str | None:
    """First non-empty line after the last ``####`` marker, if any."""
    if "####" not in text:
        return None
    rest = text.rsplit("####", 1)[1].strip()
    return rest.splitlines()[0] if rest else None


def extract_answer(response: str) -> str | None:
    """Extract the final answer of a model response.

    Order: last ``\\boxed{...}``, else the text after the last ``####``, else
    the last number. Returns ``None`` when nothing is found.
    """
    answer = _last_boxed(response)
    if answer is None:
        answer = _after_last_hashes(response)
    if answer is None:
        numbers = _NUMBER_RE.findall(response)
        answer = numbers[-1] if numbers else None
    return answer


def _ground_truth_answer(ground_truth: str) -> str:
    """Reference answer: ``\\boxed{}`` content, else GSM8K ``####`` tail, else the whole string."""
    answer = _last_boxed(ground_truth)
    if answer is None:
        answer = _after_last_hashes(ground_truth)
    return ground_truth.strip() if answer is None else answer


def _normalise(answer: str) -> str:
    """Drop ``$``, whitespace, thousands separators, a trailing period and ``.0``."""
    text = answer.replace("\\$", "").replace("$", "")
    text = _THOUSANDS_COMMA_RE.sub("", text)
    text = re.sub(r"\s+", "", text).rstrip(".")
    return _TRAILING_ZERO_DECIMAL_RE.sub(r"\1", text)


def _numbers_equal(a: str, b: str) -> bool:
    """True when both strings are numbers of (nearly) equal value."""
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return abs(x - y) <= 1e-6 * max(1.0, abs(x), abs(y))


def _math_verify_equal(expected: str, predicted: str) -> bool:
    """Symbolic comparison with ``math_verify``, with its own timeout off.

    ``math_verify`` enforces its timeout with ``signal.alarm``, which works
    only in a process's main thread and cannot interrupt C code holding the
    GIL (sympy evaluating ``9^{9^{9^{9}}}``). The coordinator bounds every
    sample instead, by scoring in worker processes it kills past
    ``models.reward.timeout_s`` (``services/coordinator/reward_pool.py``).
    """
    gold = _mv_parse(f"${expected}$", parsing_timeout=None)
    pred = _mv_parse(f"${predicted}$", parsing_timeout=None)
    return bool(gold and pred and _mv_verify(gold, pred, timeout_seconds=None))


def _answers_match(predicted: str, expected: str) -> bool:
    """Normalised string/number equality, then ``math_verify`` when available."""
    pred, gold = _normalise(predicted), _normalise(expected)
    if not pred or not gold:
        return False
    if pred == gold or _numbers_equal(pred, gold):
        return True
    return _HAS_MATH_VERIFY and _math_verify_equal(gold, pred)


@register_reward("math")
def math_reward(response: str, ground_truth: str) -> float:
    """1.0 if the response's final answer equals the ground truth's, else 0.0.

    The response answer comes from :func:`extract_answer`. The ground truth may
    be a GSM8K answer (``... #### 72``), contain ``\\boxed{}``, or be a bare
    number/expression. Never raises: any failure scores 0.0.
    """
    try:
        predicted = extract_answer(response)
        if predicted is None:
            return 0.0
        return 1.0 if _answers_match(predicted, _ground_truth_answer(ground_truth)) else 0.0
    except Exception:  # a malformed sample must not abort the episode
        return 0.0
