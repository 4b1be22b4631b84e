"""`calculator`: sums and products of 3-digit numbers, solved by calling `add` / `multiply`
(`calculator_expression`: products with 6-digit results, by calling `calculate` on the question's
expression).

A row is `{"prompt": "What is 347 * 862?", "answer": "299114"}` (`calculator_expression`: "What is
(347 * 862)?"); the episode's first message is the question. The model calls the tools
(hermes-format tool calls), then answers without a tool call; the final answer is the last
integer of that turn, and the reward is 1.0 when it equals the answer, else 0.0 (also 0.0 when
the episode ended before a final answer). With `partial_credit: w` a wrong answer earns w times
the fraction of its digits that match the answer's, position by position (`digit_credit`);
success (`solved`) stays the exact answer.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any

from posttrain.envs.tasks import check_split, last_integer, split_of, task_rng
from posttrain.envs.tools import ToolEnv, tool_call_text
from posttrain.errors import ConfigError

__all__ = [
    "CalculatorEnv",
    "CalculatorExpressionEnv",
    "add",
    "calculate",
    "digit_credit",
    "expression_transcripts",
    "make_product_rows",
    "make_rows",
    "multiply",
    "sft_transcripts",
]

TEST_FRACTION = 0.2
LOW, HIGH = 100, 999  # operands: 3-digit numbers
_OPS = {"+": "add", "*": "multiply"}


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The sum a + b.
    """
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product a * b.
    """
    return a * b


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(expression: str) -> int:
    """Evaluate an arithmetic expression of integers with +, - and * (and parentheses).

    Args:
        expression: The expression, e.g. "421 * 624".

    Returns:
        Its integer value.
    """
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"not an integer expression of +, - and *: {expression!r}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an integer expression of +, - and *: {expression!r}") from e
    return value(tree.body)


def digit_credit(given: int | None, answer: int) -> float:
    """Fraction of digit positions where `given` matches `answer`, written out left to right,
    over the longer of the two (a missing answer or another sign: 0.0).

    >>> digit_credit(932222, 931221)
    0.6666666666666666
    """
    if given is None or (given < 0) != (answer < 0):
        return 0.0
    g, a = str(abs(given)), str(abs(answer))
    return sum(x == y for x, y in zip(g, a, strict=False)) / max(len(g), len(a))


def _question(a: int, op: str, b: int, parens: bool = False) -> str:
    expression = f"{a} {op} {b}"
    return f"What is ({expression})?" if parens else f"What is {expression}?"


def _expression(question: str) -> str:
    """The expression of a generated question, as written ("421 * 624" or "(421 * 624)")."""
    return question.removeprefix("What is ").removesuffix("?")


def make_rows(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """`n` distinct calculator tasks of one split (same arguments, same rows).

    Args:
        n: number of rows.
        seed: sampling seed (does not change which split a task belongs to).
        split: `"train"` or `"test"` (a stable hash of the task picks its split).

    Returns:
        Rows `{"prompt": "What is 347 * 862?", "answer": "299114"}`.

    Raises:
        ConfigError: bad split or n (at most 100,000 rows).
    """
    return _rows(n, seed, split, "+*", 0)


def make_product_rows(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """`make_rows` of products with 6-digit results only (`calculator_expression`'s tasks).

    One result length puts every digit the model copies (question -> call, tool result ->
    answer) at one fixed distance from where it is written, which a small model learns as one
    positional copy. The expression is in parentheses, "What is (347 * 862)?", and the call
    copies it with them: its first digit then follows a "(" as in the question, so the model
    copies it like the later digits (the one after the same token back in the question), where
    without them it has no copied digit before it and needs an attention ~70 tokens back of its
    own (the digit a warm-up got wrong most). A task keeps the split it has in `make_rows`.
    """
    return _rows(n, seed, split, "*", 100_000)


def _rows(n: int, seed: int, split: str, ops: str, min_result: int) -> list[dict[str, Any]]:
    """`n` distinct tasks with an operator from `ops` and a result >= `min_result` (products:
    the expression in parentheses)."""
    check_split("calculator", split, n)
    if n > 100_000:
        raise ConfigError(f"calculator: n={n} is too many; use n <= 100000")
    rng = task_rng("calculator", split, seed)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < n:
        a, op, b = rng.randint(LOW, HIGH), rng.choice(sorted(ops)), rng.randint(LOW, HIGH)
        key = f"{a}{op}{b}"
        result = a + b if op == "+" else a * b
        if key in seen or result < min_result:
            continue
        if split_of(f"calculator:{key}", TEST_FRACTION) != split:
            continue
        seen.add(key)
        question = _question(a, op, b, parens=min_result > 0)
        rows.append({"prompt": question, "answer": str(result)})
    return rows


def _parse(question: str) -> tuple[int, str, int]:
    """(a, op, b) of a generated question."""
    a, op, b = _expression(question).strip("()").split(" ")
    return int(a), op, int(b)


def _op_call(question: str) -> tuple[str, dict[str, Any]]:
    """`add` / `multiply` with the question's two operands."""
    a, op, b = _parse(question)
    return _OPS[op], {"a": a, "b": b}


def _expression_call(question: str) -> tuple[str, dict[str, Any]]:
    """`calculate` with the question's expression, copied as one span (parentheses included)."""
    return "calculate", {"expression": _expression(question)}


def sft_transcripts(
    rows: list[dict[str, Any]], direct_fraction: float = 0.0, direct_ops: str = "+*"
) -> list[list[dict[str, Any]]]:
    """Synthetic conversations: the question, one tool call, its result, then the bare answer.

    With `direct_fraction` > 0, that share of the rows whose operator is in `direct_ops` (a
    stable hash of the question picks which) is answered directly, without the tool: the
    correct number, which a small model cannot compute in its head. A model warmed up on the mix
    calls the tool on some questions and guesses on the others, so RL has headroom: the episodes
    that call the tool succeed (e.g. `direct_ops: "+"`: the warm-up shows `add` on only some
    sums, and RL learns to call it on all).

    Args:
        rows: rows of `make_rows`.
        direct_fraction: share of those rows answered without a tool call, in [0, 1].
        direct_ops: the operators ("+", "*") whose rows may be answered directly.

    Returns:
        One message list per row: user, assistant tool call, tool result, assistant answer (or,
        for a direct row, user and assistant answer).

    Raises:
        ConfigError: direct_fraction outside [0, 1], or an unknown operator in direct_ops.
    """
    return _transcripts(rows, _op_call, direct_fraction, direct_ops)


def expression_transcripts(
    rows: list[dict[str, Any]], direct_fraction: float = 0.0, direct_ops: str = "+*"
) -> list[list[dict[str, Any]]]:
    """`sft_transcripts` with one `calculate(expression)` call instead of `add` / `multiply`.

    The call copies the question's "421 * 624" as one contiguous span at one fixed distance, where
    `add(a, b)` / `multiply(a, b)` copy two numbers to places that depend on the operator: a
    small model learns this copy sooner and at a less seed-dependent step.

    Args:
        rows: rows of `make_rows`.
        direct_fraction: as in `sft_transcripts`.
        direct_ops: as in `sft_transcripts`.

    Returns:
        One message list per row (see `sft_transcripts`).

    Raises:
        ConfigError: as in `sft_transcripts`.
    """
    return _transcripts(rows, _expression_call, direct_fraction, direct_ops)


def _transcripts(
    rows: list[dict[str, Any]],
    call: Callable[[str], tuple[str, dict[str, Any]]],
    direct_fraction: float,
    direct_ops: str,
) -> list[list[dict[str, Any]]]:
    """The transcripts of `rows`, each tool call made by `call(question) -> (name, arguments)`."""
    if not 0.0 <= direct_fraction <= 1.0:
        raise ConfigError(
            f"env.transcript_kwargs.direct_fraction={direct_fraction} is not valid; use 0..1"
        )
    if not set(direct_ops) <= set(_OPS):
        raise ConfigError(
            f"env.transcript_kwargs.direct_ops={direct_ops!r} is not valid; use operators from "
            f"{''.join(sorted(_OPS))!r}"
        )
    out = []
    for row in rows:
        a, op, b = _parse(row["prompt"])
        name, arguments = call(row["prompt"])
        result = str(add(a, b) if op == "+" else multiply(a, b))
        direct = split_of(f"calculator-direct:{row['prompt']}", direct_fraction) == "test"
        if direct and op in direct_ops:
            out.append(
                [
                    {"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": result},
                ]
            )
            continue
        out.append(
            [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": tool_call_text(name, arguments)},
                {"role": "tool", "name": name, "content": result},
                {"role": "assistant", "content": result},
            ]
        )
    return out


class CalculatorEnv(ToolEnv):
    """One calculator episode: tools `add` and `multiply`; reward 1.0 for the exact answer."""

    tools = (add, multiply)
    make_rows = staticmethod(make_rows)
    sft_transcripts = staticmethod(sft_transcripts)

    def __init__(
        self,
        partial_credit: float = 0.0,
        *,
        tool_timeout_s: float = 10.0,
        tool_output_chars: int = 2000,
    ) -> None:
        """Set the wrong answers' credit and the tool limits.

        Args:
            partial_credit: w in [0, 1): a wrong answer's reward is w * `digit_credit` (0: none).
            tool_timeout_s: wall-clock limit of one tool call (`ToolEnv`).
            tool_output_chars: cap on one observation's text (`ToolEnv`).

        Raises:
            ConfigError: partial_credit outside [0, 1), or a limit that is not positive.
        """
        if not 0.0 <= partial_credit < 1.0:
            raise ConfigError(f"env.kwargs.partial_credit={partial_credit!r}: use 0 <= w < 1")
        super().__init__(tool_timeout_s=tool_timeout_s, tool_output_chars=tool_output_chars)
        self.partial_credit = float(partial_credit)

    @property
    def solved(self) -> bool:
        """The exact answer was given (success, whatever the partial credit)."""
        return self.final_text is not None and last_integer(self.final_text) == self.answer

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Start from a row with `prompt` and `answer`; the first message is the question."""
        self.answer = int(row["answer"])
        return [{"role": "user", "content": str(row["prompt"])}]

    def final_reward(self) -> float:
        """1.0 when the final answer's last integer equals the answer, else `partial_credit`
        times its `digit_credit` (0.0 without a final answer)."""
        if self.final_text is None:
            return 0.0
        if self.solved:
            return 1.0
        return self.partial_credit * digit_credit(last_integer(self.final_text), self.answer)


class CalculatorExpressionEnv(CalculatorEnv):
    """Products of 3-digit numbers (6-digit results) with one tool, `calculate(expression)`
    (`calculator_expression`)."""

    tools = (calculate,)
    make_rows = staticmethod(make_product_rows)
    sft_transcripts = staticmethod(expression_transcripts)
