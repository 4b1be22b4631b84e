"""When a run changes its pace or ends: the learning-rate factor and the SFT early stop."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["STOP_WINDOW", "loss_below", "lr_multiplier"]

STOP_WINDOW = 10  # steps averaged by `loss_below`


def lr_multiplier(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate factor for optimizer step `step` (0-based): linear warm-up then decay.

    Args:
        step: optimizer steps already taken.
        warmup: warm-up steps (factor rises linearly from 1/warmup to 1).
        total: total optimizer steps of the run.
        schedule: `cosine`, `linear` or `constant` decay after warm-up.
        min_ratio: the factor at the end of the decay.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress_frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress_frac
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress_frac))


def loss_below(
    history: Sequence[dict[str, float]], threshold: float | None, window: int = STOP_WINDOW
) -> bool:
    """Whether the mean `loss` of the last `window` steps is below `threshold` (`train.stop_loss`).

    Args:
        history: the per-step metrics of this process's steps, oldest first.
        threshold: the stop loss; None never stops.
        window: steps averaged; fewer steps than this (a run's start) never stop.

    Returns:
        True when the run should end after its latest step.
    """
    if threshold is None:
        return False
    losses = [row["loss"] for row in history[-window:] if "loss" in row]
    return len(losses) == window and sum(losses) / window < threshold
