"""The `calculator_expression` environment: its `calculate` tool, its product tasks and its SFT
transcripts replayed through it."""

from __future__ import annotations

import random

import pytest

from posttrain.envs import calculator, environment_class, make_environment
from posttrain.envs.calculator import CalculatorExpressionEnv, calculate
from posttrain.envs.tasks import split_of
from posttrain.envs.tools import tool_call_text
from posttrain.errors import ConfigError
from tests.env_play import calls, replay


def test_calculate_evaluates_integer_expressions_and_refuses_the_rest() -> None:
    rng = random.Random(0)
    for _ in range(300):  # random expressions of + - * and parentheses, against Python's eval
        expr = str(rng.randint(-999, 999))
        for _ in range(rng.randint(1, 4)):
            expr = f"{expr} {rng.choice('+-*')} {rng.randint(0, 999)}"
            expr = f"({expr})" if rng.random() < 0.3 else expr
        assert calculate(expr) == eval(expr), expr
    for bad in ["2 ** 10", "7 / 2", "x + 1", "1.5 * 2", "", "__import__('os')", "1" * 201]:
        with pytest.raises(ValueError):
            calculate(bad)
    env = make_environment("calculator_expression", {})
    env.reset({"prompt": "What is 421 * 624?", "answer": "262704"})
    call = '<tool_call>{"name": "calculate", "arguments": {"expression": "2 ** 99"}}</tool_call>'
    result = env.step(calls(call))
    assert result.tool_outcomes == ["error"] and not result.done
    assert "not an integer expression" in result.messages[0]["content"]


def test_calculator_expression_tasks_are_6_digit_products_in_calculators_splits() -> None:
    assert environment_class("calculator_expression").make_rows is calculator.make_product_rows
    for split in ("train", "test"):
        rows = calculator.make_product_rows(300, 3, split)
        assert len({r["prompt"] for r in rows}) == 300
        assert rows == calculator.make_product_rows(300, 3, split)
        for row in rows:
            assert row["prompt"].startswith("What is (") and row["prompt"].endswith(")?")
            a, op, b = row["prompt"].removeprefix("What is (").removesuffix(")?").split()
            assert op == "*" and 100 <= int(a) <= 999 and 100 <= int(b) <= 999
            assert row["answer"] == str(int(a) * int(b)) and len(row["answer"]) == 6
            assert split_of(f"calculator:{a}*{b}", calculator.TEST_FRACTION) == split


def test_calculator_expression_transcripts_copy_the_question_and_replay() -> None:
    rows = calculator.make_product_rows(30, 0, "train") + calculator.make_rows(20, 0, "test")
    transcripts = CalculatorExpressionEnv.sft_transcripts(rows)
    for row, transcript in zip(rows, transcripts, strict=True):
        span = row["prompt"].removeprefix("What is ").removesuffix("?")
        call = {"name": "calculate", "arguments": {"expression": span}}
        assert transcript[1]["content"] == tool_call_text("calculate", call["arguments"])
        assert transcript[2] == {"role": "tool", "name": "calculate", "content": row["answer"]}
        assert replay("calculator_expression", transcript, row) == 1.0
    assert [s["function"]["name"] for s in CalculatorExpressionEnv().schemas()] == ["calculate"]
    direct = CalculatorExpressionEnv.sft_transcripts(rows, direct_fraction=1.0)
    assert direct == calculator.sft_transcripts(rows, direct_fraction=1.0)  # no call to differ


def test_digit_credit_counts_matching_positions() -> None:
    rng = random.Random(1)
    for _ in range(500):  # against a straight loop over the written digits
        answer = rng.randint(100000, 999999)
        given = int(
            "".join(c if rng.random() < 0.6 else str(rng.randint(0, 9)) for c in str(answer))
        )
        given = given if rng.random() < 0.8 else given * 10 + rng.randint(0, 9)  # one digit longer
        g, a = str(given), str(answer)
        same = 0
        for k in range(min(len(g), len(a))):
            same += g[k] == a[k]
        assert calculator.digit_credit(given, answer) == same / max(len(g), len(a))
    assert calculator.digit_credit(931221, 931221) == 1.0
    assert calculator.digit_credit(932222, 931221) == 4 / 6
    assert calculator.digit_credit(None, 12) == calculator.digit_credit(-12, 12) == 0.0


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_partial_credit_rewards_a_wrong_answers_digits_but_success_stays_exact(weight) -> None:
    from posttrain.envs.base import episode_solved

    row = {"prompt": "What is 421 * 624?", "answer": "262704"}
    for final, credit in [("262704", 1.0), ("The answer is 262714", 5 / 6), ("2627", 4 / 6)]:
        env = make_environment("calculator_expression", {"partial_credit": weight})
        env.reset(row)
        env.step(calls(final))
        reward = env.final_reward()
        exact = credit == 1.0
        assert reward == (1.0 if exact else weight * credit)
        assert episode_solved(env, reward) is exact
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="partial_credit"):
            make_environment("calculator_expression", {"partial_credit": bad})
