"""Reward functions for posttrain: ``fn(prompts, completions, **columns) -> list[float | None]``.

``None`` means "cannot judge this sample": masked out of the loss and counted, never scored 0.
Compose rewards with ``score([RewardSpec(...), ...], prompts, completions, columns)``, which runs
each under a timeout and turns any failure into ``None`` with a counted reason.
"""

from rewards.boundary import RewardResult, reward_metrics, score
from rewards.format import format_number
from rewards.math import exact_answer, math_answer
from rewards.registry import (
    RewardConfigError,
    RewardSpec,
    available,
    check_columns,
    get_reward,
    register,
    required_columns,
)

__all__ = [
    "RewardConfigError",
    "RewardResult",
    "RewardSpec",
    "available",
    "check_columns",
    "exact_answer",
    "format_number",
    "get_reward",
    "math_answer",
    "register",
    "required_columns",
    "reward_metrics",
    "score",
]
