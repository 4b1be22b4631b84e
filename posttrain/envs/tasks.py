"""Shared pieces of the built-in environments' task generators (`make_rows(n, seed, split)`).

Each task belongs to exactly one split, decided by a stable hash of its key (never of the seed),
so no held-out task appears in any train split whatever the seeds; the seed only picks which
tasks of the split are drawn, and in what order.
"""

from __future__ import annotations

import hashlib
import random
import re

from posttrain.errors import ConfigError

SPLITS = ("train", "test")
_INTEGER = re.compile(r"-?\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def split_of(key: str, test_fraction: float) -> str:
    """The split a task key belongs to: `"test"` for a stable `test_fraction` of keys."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2.0**64 < test_fraction else "train"


def check_split(env: str, split: str, n: int) -> None:
    """Raise ConfigError for an unknown split or a negative / non-integer `n`."""
    if split not in SPLITS:
        raise ConfigError(f"{env}: split={split!r} is not valid; use one of {SPLITS}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"{env}: n={n!r} is not valid; use an integer >= 0")


def task_rng(env: str, split: str, seed: int) -> random.Random:
    """The generator's random source for one (env, split, seed)."""
    return random.Random(f"{env}:{split}:{seed}")


def last_integer(text: str) -> int | None:
    """The last integer written in `text` ("1,234" counts as 1234), or None."""
    found = _INTEGER.findall(_THOUSANDS.sub("", text))
    return int(found[-1]) if found else None
