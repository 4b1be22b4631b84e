"""Deterministic synthetic arithmetic task for tiny char-level models.

Rows look like ``{"prompt": "37+45", "answer": "82"}``. The prompt is only the expression, so it
stays a few characters long. Each expression belongs to exactly one split, decided by a hash of its
text (not of the seed): no test expression ever appears in any train split, whatever the seeds or
operand ranges.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence

from posttrain.errors import ConfigError

SPLITS = ("train", "test")
OPS = ("+", "-")
DEFAULT_MAX_OPERAND = 99
DEFAULT_TEST_FRACTION = 0.1
# Expression spaces up to this size are enumerated (exact, duplicate-free, known capacity);
# larger ones are rejection-sampled without replacement.
_ENUMERATE_LIMIT = 250_000
_EXPRESSION = re.compile(r"([0-9]+)([+-])([0-9]+)")


def expression_split(expression: str, test_fraction: float = DEFAULT_TEST_FRACTION) -> str:
    """Which split an expression belongs to: a stable hash of its text, independent of any seed.

    Args:
        expression: e.g. ``"37+45"``.
        test_fraction: fraction of the expression space assigned to ``"test"``.

    Returns:
        ``"train"`` or ``"test"``.
    """
    digest = hashlib.sha256(expression.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2.0**64
    return "test" if bucket < test_fraction else "train"


def parse(expression: str) -> tuple[int, str, int]:
    """Split ``"<a><op><b>"`` (non-negative integer operands, op ``+``/``-``) into ``(a, op, b)``.

    Raises:
        ValueError: when the text is not such an expression.
    """
    match = _EXPRESSION.fullmatch(expression)
    if match is None:
        raise ValueError(f"not an arithmetic expression: {expression!r} (expected e.g. '12+7')")
    return int(match[1]), match[2], int(match[3])


def solve(expression: str) -> int:
    """The value of an expression such as ``"37-45"`` (here -8)."""
    a, op, b = parse(expression)
    return a + b if op == "+" else a - b


def _validate(
    split: str, n: int, max_operand: int, ops: Sequence[str], test_fraction: float
) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not valid for arithmetic; use one of {SPLITS}")
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"n={n!r} is not valid for the arithmetic task; use an integer >= 0")
    if not isinstance(max_operand, int) or max_operand < 1:
        raise ConfigError(f"max_operand={max_operand!r} is not valid; use an integer >= 1")
    if not ops or any(op not in OPS for op in ops) or len(set(ops)) != len(ops):
        raise ConfigError(f"ops={list(ops)!r} is not valid; use a non-empty subset of {list(OPS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction={test_fraction!r} is not valid; use a value in (0, 1)")


def _row(a: int, op: str, b: int, pad_width: int = 0) -> dict:
    prompt = f"{a:0{pad_width}d}{op}{b:0{pad_width}d}" if pad_width else f"{a}{op}{b}"
    return {"prompt": prompt, "answer": str(a + b if op == "+" else a - b)}


def make_split(
    split: str,
    n: int,
    seed: int,
    max_operand: int = DEFAULT_MAX_OPERAND,
    ops: Sequence[str] = OPS,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    pad_width: int = 0,
) -> list[dict]:
    """Sample ``n`` distinct expressions of one split.

    Operands are uniform integers in ``[0, max_operand]``; subtraction results may be negative. The
    same arguments always give the same rows, and a smaller ``n`` gives a prefix of a larger one.

    Args:
        split: ``"train"`` or ``"test"``.
        n: number of rows (distinct expressions).
        seed: sampling seed (does not change which split an expression belongs to).
        max_operand: largest operand value.
        ops: operators to use, a subset of ``("+", "-")``.
        test_fraction: fraction of the expression space held out for ``"test"``.
        pad_width: zero-pad operands in the prompt to this many digits (``"07+45"``); fixed
            operand positions make the task much easier for a tiny model. 0 = no padding.

    Returns:
        ``n`` rows ``{"prompt": "37+45", "answer": "82"}``.

    Raises:
        ConfigError: invalid arguments, or ``n`` larger than the split's expression count.
    """
    ops = tuple(ops)
    _validate(split, n, max_operand, ops, test_fraction)
    rng = random.Random(f"arithmetic:{split}:{seed}")
    space = (max_operand + 1) ** 2 * len(ops)
    if space <= _ENUMERATE_LIMIT:
        pool = [
            (a, op, b)
            for op in ops
            for a in range(max_operand + 1)
            for b in range(max_operand + 1)
            if expression_split(f"{a}{op}{b}", test_fraction) == split
        ]
        if n > len(pool):
            raise ConfigError(
                f"n={n} exceeds the {len(pool)} distinct {split} expressions for max_operand="
                f"{max_operand}, ops={list(ops)}; lower n or raise max_operand"
            )
        rng.shuffle(pool)
        return [_row(*t, pad_width=pad_width) for t in pool[:n]]
    # Keep rejection sampling fast: at most half of the split's (expected) expression count.
    limit = int(space * (test_fraction if split == "test" else 1.0 - test_fraction)) // 2
    if n > limit:
        raise ConfigError(f"n={n} is too many for max_operand={max_operand}; use n <= {limit}")
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < n:
        a, op, b = rng.randint(0, max_operand), rng.choice(ops), rng.randint(0, max_operand)
        expression = f"{a}{op}{b}"
        if expression in seen or expression_split(expression, test_fraction) != split:
            continue
        seen.add(expression)
        rows.append(_row(a, op, b, pad_width))
    return rows


def sft_completion(row: dict) -> str:
    """The target completion for supervised fine-tuning: just the answer string (e.g. ``"82"``)."""
    return str(row["answer"])


def wrong_answer(row: dict, rng: random.Random) -> str:
    """A plausible wrong answer for preference data (off by one/two/ten, sign or operator mistake).

    Args:
        row: an arithmetic row with ``prompt`` (or ``raw_prompt``, the expression before
            `data.prompt_template`) and ``answer``.
        rng: source of randomness (``random.Random``); the same state gives the same answer.

    Returns:
        An integer string that differs from ``row["answer"]``.
    """
    correct = int(row["answer"])
    candidates = {correct + d for d in (-10, -2, -1, 1, 2, 10)}
    candidates.add(-correct)
    a, _, b = parse(str(row.get("raw_prompt", row["prompt"])))  # before data.prompt_template
    candidates.update({a - b, a + b, b - a})
    candidates.discard(correct)
    return str(rng.choice(sorted(candidates)))
