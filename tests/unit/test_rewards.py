"""Tests for services.coordinator.rewards."""

from __future__ import annotations

import threading

import pytest

from services.coordinator import rewards
from services.coordinator.rewards import (
    TOY_ECHO_LENGTH,
    extract_answer,
    get_reward,
    register_reward,
    reward_names,
)

toy_echo = get_reward("toy_echo")
math_reward = get_reward("math")

GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


# --------------------------------------------------------------------------- registry


def test_registry_lists_shipped_rewards() -> None:
    assert {"toy_echo", "math"} <= set(reward_names())
    assert reward_names() == sorted(reward_names())


def test_unknown_reward_names_key_lists_and_suggests() -> None:
    with pytest.raises(ValueError) as err:
        get_reward("toy_ecko")
    message = str(err.value)
    assert "models.reward.name" in message
    assert "'toy_ecko'" in message
    assert "math" in message and "toy_echo" in message
    assert "did you mean 'toy_echo'" in message


def test_duplicate_registration_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math")(lambda response, ground_truth: 0.0)


# --------------------------------------------------------------------------- toy_echo


def test_toy_echo_length_constant() -> None:
    assert TOY_ECHO_LENGTH == 8


def test_toy_echo_total_credit() -> None:
    assert toy_echo(" ".join(["c"] * TOY_ECHO_LENGTH), "c") == 1.0


def test_toy_echo_partial_credit() -> None:
    assert toy_echo("c c x c d c", "c") == pytest.approx(4 / 8)
    assert toy_echo("c", "c") == pytest.approx(1 / 8)


def test_toy_echo_zero_credit() -> None:
    assert toy_echo("a b d e f g h i", "c") == 0.0
    assert toy_echo("", "c") == 0.0
    assert toy_echo("cc c. C", "c") == 0.0


def test_toy_echo_only_first_eight_words_count() -> None:
    response = " ".join(["x"] * TOY_ECHO_LENGTH + ["c"] * 20)
    assert toy_echo(response, "c") == 0.0
    response = " ".join(["c"] * 20)
    assert toy_echo(response, "c") == 1.0


def test_toy_echo_splits_on_any_whitespace() -> None:
    assert toy_echo("c\nc\tc  c c c c c", "c") == 1.0


def test_toy_echo_garbage_is_zero() -> None:
    assert toy_echo(None, "c") == 0.0  # type: ignore[arg-type]


# --------------------------------------------------------------------------- answer extraction


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so \\boxed{3} and finally \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}} done", "\\frac{\\sqrt{2}}{2}"),
        ("answer \\boxed{7} then truncated \\boxed{\\frac{1", "7"),
        ("work 12 then #### 1,234\nthanks 99", "1,234"),
        ("1 plus 2 is 3. Then 40 + 2 = 42.", "42"),
        ("from 5-10 items", "10"),
        ("the total is -3.5 degrees", "-3.5"),
        ("no digits at all", None),
    ],
)
def test_extract_answer(response: str, expected: str | None) -> None:
    assert extract_answer(response) == expected


def test_extract_answer_degenerate_repetition_is_fast() -> None:
    response = "\\boxed{5} " + "\\boxed{x " * 20_000
    assert extract_answer(response) == "5"


# --------------------------------------------------------------------------- math


def test_math_gsm8k_ground_truth() -> None:
    assert math_reward("So she sold 72 clips.", GSM8K_ANSWER) == 1.0
    assert math_reward("The answer is \\boxed{72}.", GSM8K_ANSWER) == 1.0
    assert math_reward("reasoning...\n#### 72", GSM8K_ANSWER) == 1.0


def test_math_wrong_answer_is_zero() -> None:
    assert math_reward("So she sold 71 clips.", GSM8K_ANSWER) == 0.0
    assert math_reward("\\boxed{72.5}", "72") == 0.0
    assert math_reward("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}") == 0.0


def test_math_boxed_nested_braces() -> None:
    assert math_reward("thus \\boxed{\\frac{1}{2}}", "\\frac{1}{2}") == 1.0
    assert math_reward("thus \\boxed{\\frac{1}{2}}", "The result is $\\boxed{\\frac{1}{2}}$") == 1.0
    assert math_reward("thus \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}") == 1.0


def test_math_boxed_wins_over_later_numbers() -> None:
    assert math_reward("\\boxed{72} (checked 3 times)", "72") == 1.0


def test_math_thousands_separator() -> None:
    assert math_reward("#### 1,234", "1234") == 1.0
    assert math_reward("It costs $1,234.", "#### 1234") == 1.0
    assert math_reward("#### 1,234", "1235") == 0.0


def test_math_equivalent_forms() -> None:
    assert math_reward("\\boxed{72.0}", "72") == 1.0
    assert math_reward("\\boxed{0.5}", "\\frac{1}{2}") == 1.0


@pytest.mark.parametrize(
    ("response", "ground_truth"),
    [
        ("", "72"),
        ("no answer here", "72"),
        ("\\boxed{", "72"),
        ("\\boxed{}}}{{", "72"),
        ("#### ", "#### 72"),
        ("72", ""),
        ("\\boxed{\\frac{", "\\frac{1}{2}"),
        (None, "72"),
        ("72", None),
        (b"72", 72),
    ],
)
def test_math_garbage_is_zero(response: object, ground_truth: object) -> None:
    assert math_reward(response, ground_truth) == 0.0  # type: ignore[arg-type]


def test_math_works_off_the_main_thread() -> None:
    results: list[float] = []
    worker = threading.Thread(
        target=lambda: results.append(math_reward("\\boxed{0.5}", "\\frac{1}{2}"))
    )
    worker.start()
    worker.join()
    assert results == [1.0]


def test_math_fallback_without_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rewards, "_HAS_MATH_VERIFY", False)
    assert math_reward("$1,234.0$", "#### 1234") == 1.0
    assert math_reward("\\boxed{0.50}", "0.5") == 1.0
    assert math_reward("\\boxed{x+1}", "x + 1") == 1.0
    assert math_reward("\\boxed{0.5}", "\\frac{1}{2}") == 0.0  # needs math_verify
    assert math_reward("\\boxed{73}", "72") == 0.0
