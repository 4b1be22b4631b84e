"""`code_feedback`: write a small Python function, see the failing tests, revise.

A row is `{"prompt": "Write def add(a, b): return a + b.", "entry": "add", "tests": [asserts...]}`.
Each assistant turn is an attempt (its last ```python block, see `rewards.code.extract_code`);
the environment runs the row's asserts on it in the sandbox (rewards/sandbox.py) and answers with
one user message: "all N tests passed", or "k/N tests passed" and one line per failing assert
with its reason. The episode ends when all pass or after `max_attempts` attempts; the final
reward is the fraction of tests the last attempt passed. A sandbox failure (not the program's
fault) raises RuntimeError rather than scoring the attempt.
"""

from __future__ import annotations

from typing import Any

from posttrain.envs.base import StepResult, Turn
from posttrain.envs.tasks import check_split, split_of, task_rng
from posttrain.errors import ConfigError

__all__ = ["TASKS", "CodeFeedbackEnv", "make_rows", "sft_transcripts", "task_row"]

TEST_FRACTION = 0.25

# (entry point, signature, what it returns, solution body, asserts)
TASKS: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("add", "add(a, b)", "a + b", "return a + b",
     ("add(2, 3) == 5", "add(-1, 1) == 0", "add(0, 0) == 0", "add(10, 5) == 15")),
    ("sub", "sub(a, b)", "a - b", "return a - b",
     ("sub(5, 3) == 2", "sub(0, 4) == -4", "sub(7, 7) == 0")),
    ("is_even", "is_even(n)", "True if n is even", "return n % 2 == 0",
     ("is_even(4)", "not is_even(3)", "is_even(0)", "not is_even(-1)")),
    ("rev", "rev(s)", "s reversed", "return s[::-1]",
     ("rev('ab') == 'ba'", "rev('') == ''", "rev('abc') == 'cba'")),
    ("square", "square(n)", "n * n", "return n * n",
     ("square(3) == 9", "square(-2) == 4", "square(0) == 0")),
    ("maximum", "maximum(a, b)", "the larger of a and b", "return max(a, b)",
     ("maximum(1, 2) == 2", "maximum(5, 3) == 5", "maximum(-1, -4) == -1")),
    ("absolute", "absolute(n)", "|n|", "return abs(n)",
     ("absolute(-3) == 3", "absolute(4) == 4", "absolute(0) == 0")),
    ("first", "first(xs)", "the first item of xs", "return xs[0]",
     ("first([1, 2]) == 1", "first('ab') == 'a'", "first([7]) == 7")),
    ("last", "last(xs)", "the last item of xs", "return xs[-1]",
     ("last([1, 2]) == 2", "last('ab') == 'b'", "last([7]) == 7")),
    ("count_a", "count_a(s)", "how many 'a' are in s", "return s.count('a')",
     ("count_a('banana') == 3", "count_a('') == 0", "count_a('xyz') == 0")),
    ("double", "double(n)", "2 * n", "return 2 * n",
     ("double(2) == 4", "double(0) == 0", "double(-3) == -6")),
    ("is_empty", "is_empty(s)", "True if s is empty", "return len(s) == 0",
     ("is_empty('')", "not is_empty('a')", "is_empty([])")),
    ("length", "length(xs)", "the number of items in xs", "return len(xs)",
     ("length([1, 2, 3]) == 3", "length('') == 0", "length([0]) == 1")),
    ("upper", "upper(s)", "s in upper case", "return s.upper()",
     ("upper('ab') == 'AB'", "upper('') == ''", "upper('A1') == 'A1'")),
    ("halve", "halve(n)", "n // 2", "return n // 2",
     ("halve(4) == 2", "halve(5) == 2", "halve(0) == 0")),
    ("neg", "neg(n)", "-n", "return -n", ("neg(3) == -3", "neg(-2) == 2", "neg(0) == 0")),
    ("total", "total(xs)", "the sum of xs", "return sum(xs)",
     ("total([1, 2, 3]) == 6", "total([]) == 0", "total([-1, 1]) == 0")),
    ("min3", "min3(a, b, c)", "the smallest of a, b, c", "return min(a, b, c)",
     ("min3(1, 2, 3) == 1", "min3(3, 1, 2) == 1", "min3(2, 2, 0) == 0")),
    ("is_pos", "is_pos(n)", "True if n > 0", "return n > 0",
     ("is_pos(1)", "not is_pos(0)", "not is_pos(-5)")),
    ("last_char", "last_char(s)", "the last character of s", "return s[-1]",
     ("last_char('ab') == 'b'", "last_char('x') == 'x'", "last_char('hey') == 'y'")),
)  # fmt: skip
_BY_ENTRY = {task[0]: task for task in TASKS}


def task_row(entry: str) -> dict[str, Any]:
    """The row of the task whose function is `entry` (e.g. "add"), whatever its split."""
    if entry not in _BY_ENTRY:
        raise ConfigError(f"code_feedback: no task {entry!r}; tasks: {', '.join(_BY_ENTRY)}")
    _, signature, returns, _, asserts = _BY_ENTRY[entry]
    return {
        "prompt": f"Write a Python function {signature} that returns {returns}.",
        "entry": entry,
        "tests": [f"assert {a}" for a in asserts],
    }


def make_rows(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """`n` coding tasks of one split; tasks repeat (there are only `len(TASKS)`).

    Args:
        n: number of rows.
        seed: sampling seed (does not change which split a task belongs to).
        split: `"train"` or `"test"`: disjoint sets of tasks (a stable hash picks each).

    Returns:
        Rows `{"prompt", "entry", "tests"}` (tests: a list of assert statements).
    """
    check_split("code_feedback", split, n)
    pool = [t for t in TASKS if split_of(f"code_feedback:{t[0]}", TEST_FRACTION) == split]
    rng = task_rng("code_feedback", split, seed)
    order: list[tuple[str, str, str, str, tuple[str, ...]]] = []
    while len(order) < n:  # every task once per round, each round shuffled
        order += rng.sample(pool, len(pool))
    return [task_row(t[0]) for t in order[:n]]


def _solution(entry: str) -> str:
    _, signature, _, body, _ = _BY_ENTRY[entry]
    return f"```python\ndef {signature}:\n    {body}\n```"


def sft_transcripts(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Ideal conversations: the task, a correct solution, "all N tests passed".

    Args:
        rows: rows of `make_rows`.

    Returns:
        One message list per row.
    """
    return [
        [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": _solution(row["entry"])},
            {"role": "user", "content": f"all {len(row['tests'])} tests passed"},
        ]
        for row in rows
    ]


class CodeFeedbackEnv:
    """One coding episode (no tools): attempts are tested in the sandbox and answered."""

    make_rows = staticmethod(make_rows)
    sft_transcripts = staticmethod(sft_transcripts)

    def __init__(self, max_attempts: int = 3, timeout_s: float = 5.0) -> None:
        """Set the budget and the sandbox limit.

        Args:
            max_attempts: attempts before the episode ends.
            timeout_s: wall-clock and CPU limit of one attempt's test run.
        """
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigError(f"code_feedback: max_attempts={max_attempts!r}; use an integer >= 1")
        if timeout_s <= 0:
            raise ConfigError(f"code_feedback: timeout_s={timeout_s!r}; use a positive number")
        self.tools: list[Any] = []
        self.max_attempts, self.timeout_s = max_attempts, float(timeout_s)
        self.attempts, self.score = 0, 0.0

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Start from a row with `prompt` and `tests` (a list of assert statements)."""
        self.tests = [str(t) for t in row["tests"]]
        self.attempts, self.score = 0, 0.0
        return [{"role": "user", "content": str(row["prompt"])}]

    def step(self, turn: Turn) -> StepResult:
        """Test one attempt; answer with the result; done when all pass or attempts run out.

        Args:
            turn: the assistant turn holding the code.

        Returns:
            One user message (the test report), progress = the fraction passed.

        Raises:
            RuntimeError: the sandbox itself failed.
        """
        from rewards.code import code_tests_detailed

        self.attempts += 1
        limits = {"cpu_seconds": self.timeout_s, "wall_seconds": self.timeout_s}
        res = code_tests_detailed([""], [turn.text], ["\n".join(self.tests)], **limits)[0]
        if res.reward is None:
            raise RuntimeError(f"code_feedback: the sandbox failed: {res.reason}")
        self.score = res.reward
        failed = [
            f"failed: {test} ({why})"
            for test, why in zip(self.tests, res.test_reasons, strict=True)
            if why is not None
        ]
        total = len(self.tests)
        report = f"all {total} tests passed" if not failed else f"{res.passed}/{total} tests passed"
        done = not failed or self.attempts >= self.max_attempts
        return StepResult(
            messages=[{"role": "user", "content": "\n".join([report, *failed])}],
            done=done,
            progress=self.score,
        )

    def final_reward(self) -> float:
        """The fraction of tests the last attempt passed (0.0 before any attempt)."""
        return self.score
