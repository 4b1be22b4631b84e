"""`guess_number`: find a secret number in [1, high] from "higher" / "lower" hints (no tools).

A row is `{"prompt": "Guess my number from 1 to 16.", "secret": 11, "high": 16}`. Each assistant
turn is one guess (the last integer in its text; a turn without one is a wasted guess); the
environment answers with one user message: "higher", "lower" or "correct" (a wasted guess gets
"reply with a number from 1 to N"). The episode ends on "correct" or after `max_guesses`
guesses. Final reward: 1.0 - turn_cost * (guesses - 1) when found (never below 0), else 0.0.
Progress after each guess (for `advantage.credit: progress`): the share of the uncertainty the
hints have resolved, on a log scale: 1 - log(n + 1) / log(high + 1), n the numbers still
consistent with the hints (n = high at the start, 0 once found).
"""

from __future__ import annotations

import math
import random
from typing import Any

from posttrain.envs.base import StepResult, Turn
from posttrain.envs.tasks import check_split, last_integer, split_of, task_rng
from posttrain.errors import ConfigError

__all__ = ["GuessNumberEnv", "interval_progress", "make_rows", "sft_transcripts"]

TEST_FRACTION = 0.25
DEFAULT_HIGH = 16
# the range sizes of the task generator: a task is "from 1 to N" for N in this range
HIGHS = (8, 30)


def _highs(highs: tuple[int, int], split: str) -> list[int]:
    """The range sizes N of one split (both splits non-empty)."""
    lo, hi = highs
    pool = [h for h in range(lo, hi + 1) if split_of(f"guess:high:{h}", TEST_FRACTION) == split]
    if not pool:
        raise ConfigError(f"guess_number: highs={highs} is too narrow to have a {split} split")
    return pool


def make_rows(
    n: int, seed: int = 0, split: str = "train", highs: tuple[int, int] = HIGHS
) -> list[dict[str, Any]]:
    """`n` guessing tasks of one split: a range [1, N] and a secret drawn uniformly from it.

    The split is by range size N (a stable hash of N picks each), not by secret: every secret
    position occurs in both splits, and a held-out task asks for the same search over a range
    size never seen in training. (A split by secret would let RL learn to avoid the held-out
    numbers, since they are never a winning answer in training.)

    Args:
        n: number of rows.
        seed: sampling seed (does not change which split a range size belongs to).
        split: `"train"` or `"test"`: disjoint sets of range sizes.
        highs: the smallest and largest N (each >= 4).

    Returns:
        Rows `{"prompt", "secret", "high"}`.
    """
    check_split("guess_number", split, n)
    lo, hi = highs
    if not (isinstance(lo, int) and isinstance(hi, int) and 4 <= lo <= hi):
        raise ConfigError(f"guess_number: highs={highs!r} is not valid; use integers 4 <= lo <= hi")
    pool, rng = _highs((lo, hi), split), task_rng("guess_number", split, seed)
    rows = []
    for _ in range(n):
        high = rng.choice(pool)
        rows.append(
            {
                "prompt": f"Guess my number from 1 to {high}.",
                "secret": rng.randint(1, high),
                "high": high,
            }
        )
    return rows


def _reply(guess: int | None, secret: int, high: int) -> str:
    if guess is None:
        return f"reply with a number from 1 to {high}"
    return "correct" if guess == secret else "higher" if guess < secret else "lower"


def interval_progress(lo: int, hi: int, high: int, solved: bool) -> float:
    """1 - log(n + 1) / log(high + 1): n = hi - lo + 1 numbers left in [lo, hi] (0 once solved).

    0.0 for the whole range [1, high], 1.0 once found; each halving of the interval adds about
    1 / log2(high + 1).
    """
    n = 0 if solved else max(hi - lo + 1, 0)
    return 1.0 - math.log(n + 1) / math.log(high + 1)


def sft_transcripts(
    rows: list[dict[str, Any]], random_fraction: float = 0.0
) -> list[list[dict[str, Any]]]:
    """Synthetic conversations: binary search (at most ceil(log2(high + 1)) guesses).

    With `random_fraction` > 0, that share of the transcripts (picked at random, reproducibly,
    by position) guesses a uniformly random number still consistent with the hints instead of
    the midpoint: it always finds the number, in more guesses. A model warmed up on the mix
    searches sometimes well and sometimes not, so RL (with a `turn_cost` or a tight
    `max_guesses`) has room to raise success and cut the turns used.

    Args:
        rows: rows of `make_rows`.
        random_fraction: share of transcripts with random consistent guesses, in [0, 1].

    Returns:
        One message list per row: the prompt, then each guess and the environment's reply.

    Raises:
        ConfigError: random_fraction outside [0, 1].
    """
    if not 0.0 <= random_fraction <= 1.0:
        raise ConfigError(
            f"env.transcript_kwargs.random_fraction={random_fraction} is not valid; use 0..1"
        )
    out = []
    for i, row in enumerate(rows):
        secret, high = int(row["secret"]), int(row.get("high", DEFAULT_HIGH))
        rng = random.Random(f"guess_number-sft:{i}:{secret}")
        search_randomly = rng.random() < random_fraction
        lo, hi = 1, high
        messages: list[dict[str, Any]] = [{"role": "user", "content": row["prompt"]}]
        while True:
            guess = rng.randint(lo, hi) if search_randomly else (lo + hi) // 2
            reply = _reply(guess, secret, high)
            messages += [
                {"role": "assistant", "content": str(guess)},
                {"role": "user", "content": reply},
            ]
            if reply == "correct":
                break
            lo, hi = (guess + 1, hi) if reply == "higher" else (lo, guess - 1)
        out.append(messages)
    return out


class GuessNumberEnv:
    """One guessing episode (no tools); state: the secret and the guesses made so far."""

    make_rows = staticmethod(make_rows)
    sft_transcripts = staticmethod(sft_transcripts)

    def __init__(self, max_guesses: int = 6, turn_cost: float = 0.0) -> None:
        """Set the budget.

        Args:
            max_guesses: guesses allowed before the episode ends unsolved (binary search over
                [1, 16] needs at most 5).
            turn_cost: reward subtracted per guess after the first.
        """
        if not isinstance(max_guesses, int) or max_guesses < 1:
            raise ConfigError(f"guess_number: max_guesses={max_guesses!r}; use an integer >= 1")
        if not 0.0 <= turn_cost < 1.0:
            raise ConfigError(f"guess_number: turn_cost={turn_cost!r}; use a value in [0, 1)")
        self.tools: list[Any] = []
        self.max_guesses, self.turn_cost = max_guesses, float(turn_cost)
        self.guesses, self.solved = 0, False

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Start from a row with `prompt`, `secret` and optionally `high` (default 16)."""
        self.secret, self.high = int(row["secret"]), int(row.get("high", DEFAULT_HIGH))
        self.guesses, self.solved = 0, False
        self.lo, self.hi = 1, self.high  # the numbers still consistent with the hints
        return [{"role": "user", "content": str(row["prompt"])}]

    def step(self, turn: Turn) -> StepResult:
        """Answer one guess with "higher" / "lower" / "correct"; done when found or out of guesses.

        Args:
            turn: the assistant turn; its last integer is the guess.

        Returns:
            One user message; done on "correct" or when `max_guesses` guesses are used; the
            progress after the guess (`interval_progress`).
        """
        self.guesses += 1
        guess = last_integer(turn.text)
        reply = _reply(guess, self.secret, self.high)
        self.solved = reply == "correct"
        if guess is not None and reply == "higher":
            self.lo = max(self.lo, guess + 1)
        elif guess is not None and reply == "lower":
            self.hi = min(self.hi, guess - 1)
        done = self.solved or self.guesses >= self.max_guesses
        return StepResult(
            messages=[{"role": "user", "content": reply}],
            done=done,
            progress=interval_progress(self.lo, self.hi, self.high, self.solved),
        )

    def final_reward(self) -> float:
        """1.0 - turn_cost * (guesses - 1) when found (at least 0.0), else 0.0."""
        if not self.solved:
            return 0.0
        return max(0.0, 1.0 - self.turn_cost * (self.guesses - 1))
