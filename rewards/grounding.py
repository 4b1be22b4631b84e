"""Grounding rewards for vision-language tasks: the IoU of a predicted box with the gold box.

Boxes are ``[x1, y1, x2, y2]`` corners (any units, as long as prediction and gold agree: pixels
or normalised), ``x1 < x2`` and ``y1 < y2``; the area is ``(x2 - x1) * (y2 - y1)``, as for
`posttrain.data.shapes` boxes (``x2``/``y2`` one past the last pixel).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from rewards.boundary import RewardOutput

__all__ = ["box_iou", "iou", "parse_box"]

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_BOX_RE = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")

Box = tuple[float, float, float, float]


def parse_box(text: str) -> Box | None:
    """The last ``[x1, y1, x2, y2]`` in `text` (ints or floats, spaces anywhere), or None.

    A box whose corners are not ordered (``x2 <= x1`` or ``y2 <= y1``) is None too.
    """
    matches = _BOX_RE.findall(text)
    if not matches:
        return None
    box = tuple(float(v) for v in matches[-1])
    return box if _valid(box) else None  # type: ignore[return-value]


def _valid(box: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in box) and box[0] < box[2] and box[1] < box[3]


def _gold(value: Any) -> Box | None:
    """A gold box from a row: four numbers (list/tuple) or a string holding ``[x1, y1, x2, y2]``."""
    if isinstance(value, str):
        return parse_box(value)
    numbers = isinstance(value, Sequence) and len(value) == 4
    if numbers and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        box = tuple(float(v) for v in value)
        return box if _valid(box) else None  # type: ignore[return-value]
    return None


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ordered boxes, in [0, 1]."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_iou(
    prompts: list[str],
    completions: list[str],
    box_column: str = "box",
    threshold: float | None = None,
    **_columns: Any,
) -> RewardOutput:
    """IoU of the last ``[x1, y1, x2, y2]`` in each completion with the row's gold box.

    Args:
        prompts: [N] prompts (unused).
        completions: [N] completions.
        box_column: the column holding the gold box: four numbers, or text ``"[x1, y1, x2, y2]"``.
        threshold: when set (in (0, 1]), the score is 1.0 for IoU >= threshold, else 0.0.
        **_columns: the dataset columns (the gold box is ``_columns[box_column]``).

    Returns:
        [N] scores in [0, 1]: 0 for a completion with no box or an unordered one; ``None``
        (reason ``no_gold_box``) for a row whose gold box is missing or invalid. Batch metrics
        ``parsed`` (share of completions with a box) and ``iou_mean`` (raw IoU over judged rows).
    """
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"box_iou: threshold={threshold!r} must be in (0, 1] or null")
    if box_column not in _columns:
        raise ValueError(f"box_iou: no column {box_column!r} (box_column) in the rows")
    golds = _columns[box_column]
    scores: list[float | None] = []
    reasons: list[str | None] = []
    raw: list[float] = []
    parsed = 0
    for completion, gold_value in zip(completions, golds, strict=True):
        gold = _gold(gold_value)
        pred = parse_box(completion)
        parsed += pred is not None
        if gold is None:
            scores.append(None)
            reasons.append("no_gold_box")
            continue
        value = iou(pred, gold) if pred is not None else 0.0
        raw.append(value)
        scores.append(value if threshold is None else float(value >= threshold))
        reasons.append(None)
    metrics = {"parsed": parsed / len(completions)} if completions else {}
    if raw:
        metrics["iou_mean"] = sum(raw) / len(raw)
    return RewardOutput(scores, reasons, metrics=metrics)
