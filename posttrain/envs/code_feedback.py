"""`code_feedback`: write a small Python function, see the failing tests, revise.

A task is a function family and a 2-digit constant K, e.g. "Write a Python function plus(n)
that returns n + 37." with asserts computed from the family's formula (`assert plus(5) == 42`).
Each assistant turn is an attempt (its last ```python block, see `rewards.code.extract_code`);
the environment runs the row's asserts on it in the sandbox (rewards/sandbox.py) and answers with
one user message: "all N tests passed", or "k/N tests passed" and one line per failing test
(`failed: plus(5) == 42`, with the reason in parentheses when it is not a plain failed assert).
The episode ends when all pass or after `max_attempts` attempts; the final reward is the fraction
of tests the last attempt passed (partial credit: `above(n)` with a wrong constant passes some).

Held-out tasks are (family, K) pairs never trained on: every family and every digit occurs in
both splits, so a model that learned to carry the constant from the task into its code can solve
them (the tiny character-level model cannot write a function it never saw, so a split by
function would leave nothing to learn). The SFT transcripts can include a share of revisions
(`revise_fraction`): a first attempt with a wrong constant, the environment's report, the fix.
A sandbox failure (not the program's fault) raises RuntimeError rather than scoring the attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from posttrain.envs.base import StepResult, Turn
from posttrain.envs.tasks import check_split, split_of, task_rng
from posttrain.errors import ConfigError

__all__ = ["FAMILIES", "CodeFeedbackEnv", "make_rows", "sft_transcripts", "task_row"]

TEST_FRACTION = 0.25
CONSTANTS = range(10, 100)  # K: two digits


class Family(NamedTuple):
    """A task family: what its function returns and how, with `{k}` for the constant."""

    returns: str  # as the task says it
    body: str  # the solution's return expression
    inputs: Callable[[int], tuple[int, ...]]  # the test inputs, given K
    value: Callable[[int, int], Any]  # the right value of (n, K)


FAMILIES: dict[str, Family] = {
    "plus": Family("n + {k}", "n + {k}", lambda k: (0, 5, -3), lambda n, k: n + k),
    "minus": Family("n - {k}", "n - {k}", lambda k: (0, 5, 100), lambda n, k: n - k),
    "times": Family("n * {k}", "n * {k}", lambda k: (0, 1, 3), lambda n, k: n * k),
    "above": Family("True if n > {k}", "n > {k}", lambda k: (k + 1, k, k - 7), lambda n, k: n > k),
}


def _asserts(entry: str, k: int) -> list[str]:
    """The family's asserts for constant `k`, values computed from its formula."""
    family = FAMILIES[entry]
    out = []
    for n in family.inputs(k):
        v = family.value(n, k)
        if isinstance(v, bool):
            out.append(f"assert {'' if v else 'not '}{entry}({n})")
        else:
            out.append(f"assert {entry}({n}) == {v}")
    return out


def task_row(entry: str, k: int) -> dict[str, Any]:
    """The row of the task `entry` (a family, e.g. "plus") with constant `k`, whatever its split."""
    if entry not in FAMILIES:
        raise ConfigError(
            f"code_feedback: no task family {entry!r}; families: {', '.join(FAMILIES)}"
        )
    returns = FAMILIES[entry].returns.format(k=k)
    return {
        "prompt": f"Write a Python function {entry}(n) that returns {returns}.",
        "entry": entry,
        "k": k,
        "tests": _asserts(entry, k),
    }


def make_rows(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """`n` coding tasks of one split; tasks repeat once every task of the split was drawn.

    Args:
        n: number of rows.
        seed: sampling seed (does not change which split a task belongs to).
        split: `"train"` or `"test"`: disjoint sets of (family, K) tasks (a stable hash picks).

    Returns:
        Rows `{"prompt", "entry", "k", "tests"}` (tests: a list of assert statements).
    """
    check_split("code_feedback", split, n)
    pool = [
        (entry, k)
        for entry in FAMILIES
        for k in CONSTANTS
        if split_of(f"code_feedback:{entry}:{k}", TEST_FRACTION) == split
    ]
    rng = task_rng("code_feedback", split, seed)
    order: list[tuple[str, int]] = []
    while len(order) < n:  # every task once per round, each round shuffled
        order += rng.sample(pool, len(pool))
    return [task_row(entry, k) for entry, k in order[:n]]


def solution(entry: str, k: int) -> str:
    """An attempt at task (`entry`, `k`): the family's function with constant `k`."""
    return f"```python\ndef {entry}(n):\n    return {FAMILIES[entry].body.format(k=k)}\n```"


def report(tests: list[str], reasons: list[str | None]) -> str:
    """The environment's answer to an attempt: its test results, one line per failing test.

    Args:
        tests: the assert statements.
        reasons: per test, None (passed) or the sandbox's reason (`assertion_failed`, ...).
    """
    failed = [
        f"failed: {test.removeprefix('assert ')}"
        + ("" if why == "assertion_failed" else f" ({why})")
        for test, why in zip(tests, reasons, strict=True)
        if why is not None
    ]
    if not failed:
        return f"all {len(tests)} tests passed"
    return "\n".join([f"{len(tests) - len(failed)}/{len(tests)} tests passed", *failed])


def _wrong_constant(row: dict[str, Any]) -> int:
    """A deterministic other 2-digit constant for a revision transcript's first attempt."""
    k = int(row["k"])
    shift = 1 + int(split_of(f"code_feedback-shift:{row['prompt']}", 0.5) == "test")
    return k + shift if k + shift in CONSTANTS else k - shift


def sft_transcripts(
    rows: list[dict[str, Any]], revise_fraction: float = 0.0
) -> list[list[dict[str, Any]]]:
    """Ideal conversations: the task, a correct solution, "all N tests passed"; with
    `revise_fraction` > 0 that share of the rows (a stable hash picks) first tries a neighbouring
    constant, gets the environment's report of it, then writes the correct solution.

    Args:
        rows: rows of `make_rows`.
        revise_fraction: share of revision transcripts, in [0, 1].

    Returns:
        One message list per row.
    """
    if not 0.0 <= revise_fraction <= 1.0:
        raise ConfigError(
            f"env.transcript_kwargs.revise_fraction={revise_fraction} is not valid; use 0..1"
        )
    out = []
    for row in rows:
        entry, k = row["entry"], int(row["k"])
        messages = [{"role": "user", "content": row["prompt"]}]
        if split_of(f"code_feedback-revise:{row['prompt']}", revise_fraction) == "test":
            wrong = _wrong_constant(row)
            family = FAMILIES[entry]
            reasons = [
                None if family.value(n, wrong) == family.value(n, k) else "assertion_failed"
                for n in family.inputs(k)
            ]
            messages += [
                {"role": "assistant", "content": solution(entry, wrong)},
                {"role": "user", "content": report(row["tests"], reasons)},
            ]
        messages += [
            {"role": "assistant", "content": solution(entry, k)},
            {"role": "user", "content": f"all {len(row['tests'])} tests passed"},
        ]
        out.append(messages)
    return out


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
        failed = any(why is not None for why in res.test_reasons)
        done = not failed or self.attempts >= self.max_attempts
        return StepResult(
            messages=[{"role": "user", "content": report(self.tests, res.test_reasons)}],
            done=done,
            progress=self.score,
        )

    def final_reward(self) -> float:
        """The fraction of tests the last attempt passed (0.0 before any attempt)."""
        return self.score
