"""The two errors a run ends with on purpose, and the "did you mean" helper for their messages."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A user mistake: one line naming the field/file and what would be valid."""


class RolloutError(RuntimeError):
    """The rollout engine failed mid-run (server down or restarting, timeout, lost weights).

    The trainer saves a resumable checkpoint before letting it end the run.
    """


def did_you_mean(name: str, options: list[str]) -> str:
    """A message suffix naming the closest of `options` to `name`, or listing them all."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(options)}"
