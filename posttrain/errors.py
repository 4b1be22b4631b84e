"""The errors a run ends with on purpose, and the "did you mean" helper for their messages."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A user mistake: one line naming the field/file and what would be valid."""


class RolloutError(RuntimeError):
    """The rollout engine failed mid-run (server down or restarting, timeout, lost weights).

    The trainer saves a resumable checkpoint before letting it end the run.
    """


class StorageError(RuntimeError):
    """A checkpoint could not be written (e.g. no space left on device); nothing was left under
    its name and the newest complete checkpoint is kept. The command line ends with status 2,
    like a user mistake: the environment needs fixing (free space), then `train.resume=auto`."""


class PreemptedError(Exception):
    """SIGTERM ended the run before its Trainer was built (during the SFT warm-up), after the
    warm-up saved a checkpoint; the command line ends with status 0."""


class NumericalError(RuntimeError):
    """More steps in a row than `train.max_bad_steps` had a NaN or inf loss or gradient.

    The trainer saves the checkpoint from before the first of them before ending the run.
    """


def did_you_mean(name: str, options: list[str]) -> str:
    """A message suffix naming the closest of `options` to `name`, or listing them all."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(options)}"


def require(cond: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `cond` (the config checks' one-line errors)."""
    if not cond:
        raise ConfigError(message)
