"""The training prompt pool: per-epoch shuffled order plus SRPO history resampling.

An epoch is one pass over the pool in an order shuffled with ``random.Random(seed + epoch)``
(with the full pool this is exactly `RowStream`'s order). With history resampling on (SRPO, Zhang
et al. 2025), every scored group is recorded as *all correct* or not, and at each epoch boundary
the prompts whose most recent group was all correct leave the pool for the following epochs.

A group is all correct when every one of its samples has a correctness score ``>= 1.0`` (the
threshold evaluation uses; ``None`` = could not judge counts as not correct). A group generated
from a batch that straddles an epoch boundary is recorded after that boundary, so it counts at the
next one. The pool never shrinks below ``min_size`` prompts: when removing every all-correct prompt
would leave fewer, that boundary removes none (and the record is cleared).

Every prompt handed out is noted as ``(epoch, row index)`` until `PromptPool.take_drawn` collects
the notes (the per-step ``data_ids.jsonl``, `posttrain.runtime.data_log`).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

CORRECT_THRESHOLD = 1.0


def group_all_correct(scores: Sequence[float | None]) -> bool:
    """Whether every sample of a group is correct.

    Args:
        scores: [G] correctness scores of one prompt's samples (e.g. `exact_answer`, in {0, 1});
            ``None`` means the reward could not judge the sample.

    Returns:
        True when the group is non-empty and every score is ``>= 1.0``.
    """
    return bool(scores) and all(s is not None and s >= CORRECT_THRESHOLD for s in scores)


def update_pool(
    pool: Sequence[int], solved: Collection[int], min_size: int = 1
) -> tuple[list[int], int]:
    """The pool of the next epoch: `pool` without the `solved` prompts.

    Args:
        pool: row indices of the current pool (order is kept).
        solved: row indices whose most recent group was all correct (indices not in `pool` are
            ignored).
        min_size: the smallest pool allowed (>= 1). If removing every solved prompt would leave
            fewer than `min_size` prompts, nothing is removed.

    Returns:
        (new pool, number of prompts removed).
    """
    kept = [i for i in pool if i not in solved]
    if len(kept) < max(1, min_size):
        return list(pool), 0
    return kept, len(pool) - len(kept)


class PromptPool:
    """Resumable prompt order over a shrinking pool of rows (`pool`: row indices, increasing).

    Args:
        rows: the dataset rows (dicts).
        seed: base seed; epoch e is shuffled with ``seed + e``.
        resample: history resampling on (all-correct prompts leave at epoch boundaries).
        min_size: the pool never shrinks below this many prompts.
    """

    def __init__(
        self, rows: list[dict[str, Any]], seed: int, resample: bool = False, min_size: int = 1
    ) -> None:
        if not rows:
            raise ValueError("the dataset is empty: at least one row is needed")
        self.rows = rows
        self.seed = seed
        self.resample = resample
        self.min_size = min_size
        self.epoch = 0
        self.pos = 0
        self.pool = list(range(len(rows)))
        self.solved: set[int] = set()
        self.removed_total = 0
        self._order = self._shuffle(0)
        self.drawn: list[tuple[int, int]] = []  # (epoch, row index) since `take_drawn`

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(self.pool)
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def _next_epoch(self) -> None:
        if self.resample:
            self.pool, removed = update_pool(self.pool, self.solved, self.min_size)
            self.removed_total += removed
            self.solved = set()
        self.epoch += 1
        self.pos = 0
        self._order = self._shuffle(self.epoch)

    def take_indices(self, n: int) -> list[int]:
        """The row indices of the next `n` prompts, starting a new epoch when one runs out."""
        out = []
        while len(out) < n:
            if self.pos >= len(self._order):
                self._next_epoch()
            out.append(self._order[self.pos])
            self.drawn.append((self.epoch, out[-1]))
            self.pos += 1
        return out

    def take_drawn(self) -> list[tuple[int, int]]:
        """The ``(epoch, row index)`` of every prompt taken since the last call (then forgotten)."""
        drawn, self.drawn = self.drawn, []
        return drawn

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next `n` rows (same order as `take_indices`)."""
        return [self.rows[i] for i in self.take_indices(n)]

    def record(self, index: int, all_correct: bool) -> None:
        """Record the outcome of a group sampled for row `index` (the latest outcome wins)."""
        if all_correct:
            self.solved.add(index)
        else:
            self.solved.discard(index)

    def metrics(self) -> dict[str, float]:
        """`data/pool_size`, `data/epoch`, `data/pool_removed_total`."""
        return {
            "data/pool_size": float(len(self.pool)),
            "data/epoch": float(self.epoch),
            "data/pool_removed_total": float(self.removed_total),
        }

    def state_dict(self) -> dict[str, Any]:
        """Position, the rows out of the pool and the outcomes recorded since the last boundary.

        The pool is always the rows not removed, in index order, so only the removed are saved.
        """
        in_pool = set(self.pool)
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "removed": [i for i in range(len(self.rows)) if i not in in_pool],
            "solved": sorted(self.solved),
            "removed_total": self.removed_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Jump to a saved position (a `RowStream` state, with nothing removed, loads too)."""
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])
        removed = {int(i) for i in state.get("removed", ())}
        self.pool = [i for i in range(len(self.rows)) if i not in removed]
        self.solved = {int(i) for i in state.get("solved", ())}
        self.removed_total = int(state.get("removed_total", 0))
        self._order = self._shuffle(self.epoch)
        self.drawn = []
