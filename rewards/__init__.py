"""Reward functions for posttrain: ``fn(prompts, completions, **columns) -> list[float | None]``.

``None`` means "cannot judge this sample": masked out of the loss and counted, never scored 0.
Compose rewards with ``score([RewardSpec(...), ...], prompts, completions, columns)``, which runs
each under a timeout and turns any failure into ``None`` with a counted reason.
"""

from rewards.boundary import RewardOutput, RewardResult, per_sample, reward_metrics, score
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
from rewards.startup import validate_rewards

__all__ = [
    "RewardConfigError",
    "RewardOutput",
    "RewardResult",
    "RewardSpec",
    "available",
    "check_columns",
    "exact_answer",
    "format_number",
    "get_reward",
    "math_answer",
    "per_sample",
    "register",
    "required_columns",
    "reward_metrics",
    "score",
    "validate_rewards",
]
