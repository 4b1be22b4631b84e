"""DAPO dynamic sampling's rule in the rollout source: which groups carry a learning signal."""

from __future__ import annotations

import itertools

from posttrain.rollout.engine import Rollout
from posttrain.rollout.source import Sample, _informative


def _group(rewards: list[float | None], valid: list[bool] | None = None) -> list[Sample]:
    valid = valid or [r is not None for r in rewards]
    ro = Rollout(0, [1], [2], [-0.5], "x", "stop", 0)
    return [Sample(ro, r, v) for r, v in zip(rewards, valid, strict=True)]


def _loop_rule(group: list[Sample]) -> bool:
    """Informative: at least two valid samples whose rewards are not all equal."""
    vals = [s.reward for s in group if s.valid]
    return len(vals) >= 2 and any(a != b for a, b in itertools.combinations(vals, 2))


def test_informative_groups_by_hand():
    groups = [
        _group([1.0, 1.0, 1.0]),  # all equal
        _group([1.0, 0.0, 1.0]),  # differ
        _group([1.0, None, None]),  # one valid sample
        _group([1.0, 0.0, 0.0], [True, False, True]),  # the valid two differ (1 vs 0)
        _group([1.0, 0.0, 1.0], [True, False, True]),  # the valid two are equal
        _group([None, None, None]),
    ]
    assert _informative(groups) == [False, True, False, True, False, False]


def test_informative_equals_the_loop_rule_on_every_small_group():
    values = [0.0, 0.5, 1.0, None]
    groups = [_group(list(c)) for c in itertools.product(values, repeat=3)]
    assert _informative(groups) == [_loop_rule(g) for g in groups]
