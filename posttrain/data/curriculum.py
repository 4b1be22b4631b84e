"""Curriculum stages (SRPO two-stage training): which stage's prompts a step trains on.

Stage i covers the optimizer steps ``[end_{i-1}, end_i)`` with ``end_i`` the cumulative sum of the
stages' ``steps``; steps past the last end stay on the last stage (config validation requires the
stage steps to sum to at most ``train.steps``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from posttrain.data.loading import BUILTIN_SOURCES, load_rows
from posttrain.data.pool import PromptPool, group_all_correct
from posttrain.data.splits import format_kwargs
from posttrain.errors import ConfigError


def stage_ends(steps: Sequence[int]) -> list[int]:
    """Cumulative step counts: ``[3, 5] -> [3, 8]``."""
    return list(itertools.accumulate(steps))


def stage_at(step: int, ends: Sequence[int]) -> int:
    """The 0-based stage of optimizer step `step` (0-based); past the last end, the last stage.

    Args:
        step: optimizer steps already taken (the step being made).
        ends: cumulative stage ends from `stage_ends` (non-empty).
    """
    for i, end in enumerate(ends):
        if step < end:
            return i
    return len(ends) - 1


def load_stage_rows(cfg: Any) -> list[list[dict]]:
    """Training rows of every `data.stages` entry (empty list when there are no stages).

    Every stage is loaded up front, so a source that does not load fails before training.

    Args:
        cfg: the run Config.

    Raises:
        ConfigError: a stage's source cannot be loaded (the message names the stage).
    """
    d = cfg.data
    out = []
    for i, st in enumerate(d.stages):
        try:
            rows = load_rows(
                st.source,
                split="train",
                n=st.train_size if st.train_size is not None else d.train_size,
                seed=d.seed,
                task_kwargs=st.task if st.source in BUILTIN_SOURCES else None,
                n_name="train_size" if st.train_size is not None else "data.train_size",
                **format_kwargs(cfg),
            )
        except ConfigError as err:
            raise ConfigError(f"data.stages[{i}]: {err}") from None
        out.append(rows)
    return out


class PromptSchedule:
    """The training prompts of a run: one `PromptPool` per curriculum stage (or one in all).

    `RolloutSource` calls `set_step` before each step's generation, then `take_indices`, then
    `record` for every scored group; `metrics` reports the stage and pool after the step.

    Args:
        stage_rows: the rows of each stage (one list when there are no stages).
        stage_steps: each stage's `steps` (empty when there are no stages).
        seed: shuffle seed of every pool.
        resample: SRPO history resampling on.
        min_size: the smallest pool history resampling may leave.
    """

    def __init__(
        self,
        stage_rows: list[list[dict[str, Any]]],
        stage_steps: Sequence[int],
        seed: int,
        resample: bool = False,
        min_size: int = 1,
    ) -> None:
        self.pools = [PromptPool(rows, seed, resample, min_size) for rows in stage_rows]
        self.ends = stage_ends(stage_steps) if stage_steps else [0]
        self.staged = bool(stage_steps)
        self.stage = 0
        self._removed_at_start = 0

    @property
    def pool(self) -> PromptPool:
        """The current stage's pool."""
        return self.pools[self.stage]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The current stage's rows (indexed by `take_indices`)."""
        return self.pool.rows

    def set_step(self, step: int) -> None:
        """Enter the stage of optimizer step `step` (0-based)."""
        self.stage = stage_at(step, self.ends)
        self._removed_at_start = self.pool.removed_total

    def take_indices(self, n: int) -> list[int]:
        """Row indices (into `rows`) of the next `n` prompts of the current stage."""
        return self.pool.take_indices(n)

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next `n` rows of the current stage."""
        return self.pool.take(n)

    def record(self, indices: Sequence[int], scores: Sequence[float | None] | None) -> None:
        """Record each group's outcome for history resampling.

        Args:
            indices: [P] row indices of the groups, in generation order.
            scores: [P * G] correctness scores, prompt-major (None = no correctness reward:
                nothing is recorded).
        """
        if scores is None or not indices:
            return
        g = len(scores) // len(indices)
        for i, index in enumerate(indices):
            self.pool.record(index, group_all_correct(scores[i * g : (i + 1) * g]))

    def metrics(self) -> dict[str, float]:
        """`data/stage` (1 = first), `data/pool_size`, `data/epoch`, `data/pool_removed` (this
        step) and `data/pool_removed_total` (this stage)."""
        out = self.pool.metrics()
        out["data/pool_removed"] = float(self.pool.removed_total - self._removed_at_start)
        if self.staged:
            out["data/stage"] = float(self.stage + 1)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Every stage's pool state."""
        return {"pools": [p.state_dict() for p in self.pools]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` (or a single `RowStream` state from older checkpoints)."""
        states = state.get("pools", [state])
        if len(states) != len(self.pools):
            raise ConfigError(
                f"the checkpoint has {len(states)} prompt pools but data.stages gives "
                f"{len(self.pools)}; resume with the same data.stages"
            )
        for pool, st in zip(self.pools, states, strict=True):
            pool.load_state_dict(st)
