"""Exact data accounting: which training rows every step consumed, in `<output_dir>/data_ids.jsonl`.

One JSON object a line, one line per completed step, in step order (rank 0 writes it)::

    {"step": 3, "epoch": 0, "ids": [17, 4, 60, 9], "epochs": [0, 0, 0, 0]}

- ``step``: the step number as in `metrics.jsonl` (1 = the first optimizer-step batch).
- ``ids``: the stable id of every row the step drew from the training data, in draw order: the
  row's index in the loaded training split (`data.train_size` rows; DPO / reward model: the
  preference row's index; a curriculum stage: the index in that stage's rows). Online
  algorithms list every prompt drawn, including those of groups dynamic sampling dropped.
- ``epochs``: each id's epoch (a step can straddle an epoch boundary); ``epoch`` is the first's.
- ``stage``: with `data.stages`, the 0-based curriculum stage the rows come from.

A step whose update was skipped (non-finite, `bad_steps.jsonl`) still consumed its rows and has
its line; a step abandoned on SIGTERM has none (its rows are drawn again after the resume).
With async prefetch (`rollout.max_staleness`) a line lists the rows of the batch the step
trained on, not of the batches generated ahead of it.

Each line is written with one `write(2)` call and fsynced before the step's checkpoint can be
saved, so a kill leaves at most a torn last line, which `read_data_ids` skips. When a run
starts or resumes at step s, its first write first cuts the file back to the complete lines of
steps <= s (a temporary file renamed over it), so the file of a killed and resumed run is the
file of a straight run: every id of every epoch exactly once, none replayed or skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.runtime.storage import append_line

FILE = "data_ids.jsonl"


@dataclass
class Drawn:
    """The rows one step drew.

    Attributes:
        ids: [n] row ids, in draw order.
        epochs: [n] each row's epoch.
        stage: the curriculum stage (0-based) of the rows; None without `data.stages`.
    """

    ids: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    stage: int | None = None

    @classmethod
    def of(cls, pairs: list[tuple[int, int]], stage: int | None = None) -> Drawn:
        """From ``(epoch, id)`` pairs (what `RowStream.take_drawn` returns)."""
        return cls([int(i) for _, i in pairs], [int(e) for e, _ in pairs], stage)


def record(step: int, drawn: Drawn) -> dict[str, Any]:
    """The line of step `step` (see the module docstring)."""
    row: dict[str, Any] = {
        "step": int(step),
        "epoch": drawn.epochs[0] if drawn.epochs else None,
        "ids": list(drawn.ids),
        "epochs": list(drawn.epochs),
    }
    if drawn.stage is not None:
        row["stage"] = int(drawn.stage)
    return row


def read_data_ids(path: str | Path) -> list[dict[str, Any]]:
    """The complete lines of a `data_ids.jsonl` (a torn last line, from a kill, is skipped).

    Args:
        path: the file; a missing file reads as no lines.

    Raises:
        ValueError: a line other than the last is not valid JSON (the file was damaged).
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # no newline after it: a write cut by a kill
                break
            raise ValueError(f"{path} line {i + 1} is not valid JSON: {err}") from None
        rows.append(row)
    return rows


def truncate(path: str | Path, step: int) -> None:
    """Keep the complete lines of steps <= `step` (atomic: a temporary file renamed over it)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [row for row in read_data_ids(path) if int(row["step"]) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in keep)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class DataLog:
    """Appends each completed step's rows to `<out_dir>/data_ids.jsonl`.

    Args:
        out_dir: the run's output dir.
        enabled: whether this process writes (rank 0); the others only drop their notes.
    """

    def __init__(self, out_dir: str | Path, enabled: bool) -> None:
        self.path = Path(out_dir) / FILE
        self.enabled = enabled
        self._cut_at: int | None = None

    def start(self, step: int) -> None:
        """The run starts (or resumes) at step `step`: the first `write` first cuts the file
        back to steps <= `step` (a run that stops before training one leaves it as it was)."""
        self._cut_at = int(step)

    def write(self, step: int, drawn: Drawn | None) -> None:
        """Append step `step`'s line (nothing when `drawn` is None: no data position known)."""
        if not self.enabled or drawn is None:
            return
        if self._cut_at is not None:
            truncate(self.path, self._cut_at)
            self._cut_at = None
        append_line(self.path, json.dumps(record(step, drawn)) + "\n")


def drawn_rows(algorithm: Any) -> Drawn | None:
    """The rows the algorithm's last batch drew (its `drawn_rows()`; None if it has none)."""
    take = getattr(algorithm, "drawn_rows", None)
    return None if take is None else take()
