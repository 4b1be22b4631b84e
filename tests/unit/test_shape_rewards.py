"""RolloutSource._shape: the overlong penalty applies only when on, so max_new_tokens below the
(unchecked) overlong_buffer default is fine with the penalty off."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from posttrain.advantages import overlong_penalty
from posttrain.config import load_config
from posttrain.rollout.engine import Rollout
from posttrain.rollout.source import RolloutSource


def _rollout(n: int, reason: str) -> Rollout:
    return Rollout(0, [1], [2] * n, [0.0] * n, "x", reason, 0)


def test_short_max_new_tokens_without_overlong_penalty():
    cfg = load_config(None, ["rollout.max_new_tokens=3"])  # < overlong_buffer (4)
    assert cfg.rollout.overlong_buffer > cfg.rollout.max_new_tokens
    out = RolloutSource._shape(SimpleNamespace(cfg=cfg), [_rollout(2, "stop")], [1.0])
    assert out[0].reward == 1.0 and out[0].valid


def test_overlong_penalty_when_on():
    import torch

    cfg = load_config(None, ["rollout.max_new_tokens=8", "rollout.overlong_penalty=true"])
    out = RolloutSource._shape(SimpleNamespace(cfg=cfg), [_rollout(7, "length")], [1.0])
    want = float(overlong_penalty(torch.tensor([7.0]), 8, cfg.rollout.overlong_buffer)[0])
    assert want < 0 and out[0].reward == pytest.approx(1.0 + want)
