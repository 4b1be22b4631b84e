class ConfigError(ValueError):
    """A user mistake: one line naming the field/file and what would be valid."""


class RolloutError(RuntimeError):
    """The rollout engine failed mid-run (server down or restarting, timeout, lost weights).

    The trainer saves a resumable checkpoint before letting it end the run.
    """
