"""A resumable, deterministic stream of dataset rows (epochs reshuffled from a seed).

Every row handed out is noted as ``(epoch, row index)`` until `take_drawn` collects the notes:
the trainer writes them per step to ``data_ids.jsonl`` (`posttrain.runtime.data_log`).
"""

from __future__ import annotations

import random
from typing import Any


class RowStream:
    """Yields rows in a per-epoch shuffled order; its position is part of every checkpoint.

    Args:
        rows: the dataset rows (dicts).
        seed: base seed; epoch e is shuffled with `seed + e`.
    """

    def __init__(self, rows: list[dict[str, Any]], seed: int) -> None:
        if not rows:
            raise ValueError("the dataset is empty: at least one row is needed")
        self.rows = rows
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._shuffle(0)
        self.drawn: list[tuple[int, int]] = []  # (epoch, row index) since `take_drawn`

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[dict[str, Any]]:
        """Return the next `n` rows, starting a new epoch when one runs out."""
        out = []
        while len(out) < n:
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._shuffle(self.epoch)
            index = self._order[self.pos]
            out.append(self.rows[index])
            self.drawn.append((self.epoch, index))
            self.pos += 1
        return out

    def take_drawn(self) -> list[tuple[int, int]]:
        """The ``(epoch, row index)`` of every row taken since the last call (then forgotten)."""
        drawn, self.drawn = self.drawn, []
        return drawn

    def state_dict(self) -> dict[str, int]:
        """Position in the stream."""
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Jump to a saved position."""
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])
        self._order = self._shuffle(self.epoch)
        self.drawn = []
