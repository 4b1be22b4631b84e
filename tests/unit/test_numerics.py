"""`posttrain.runtime.numerics`: non-finite losses and gradients are seen (real autograd on a
small module), bad steps are counted against `train.max_bad_steps`, and the rows a step drew
are read from the data position. DeepSpeed's side (the suppressed update on ZeRO 0-3) is in
tests/integration/test_bad_steps.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.runtime.checkpoint import Snapshot
from posttrain.runtime.numerics import (
    LOG_FILE,
    BadStep,
    BadSteps,
    GradientCheck,
    data_position,
    describe_rows,
)


def _backward(module: torch.nn.Module, scale: float) -> None:
    module(torch.ones(1, 3)).sum().mul(scale).backward()


def test_gradient_check_sees_nonfinite_gradients_and_losses():
    module = torch.nn.Linear(3, 2)
    check = GradientCheck(module)
    check.start()
    _backward(module, 1.0)
    check.see_loss(0.5)
    assert check.agreed() == (False, False)
    _backward(module, math.nan)  # a later micro-batch of the same update
    assert check.agreed() == (False, True)
    check.start()
    module.zero_grad()
    _backward(module, math.inf)
    check.see_loss(math.inf)
    assert check.agreed() == (True, True)
    check.start()
    check.see_loss(math.nan)
    assert check.agreed() == (True, False)
    check.remove()
    check.start()
    _backward(module, math.nan)  # no hook any more
    assert check.agreed() == (False, False)


def test_data_position_of_each_stream_kind():
    assert data_position({"stream": {"epoch": 1, "pos": 8}}) == [(1, 8)]  # RowStream (SFT, DPO)
    pools = {"pools": [{"epoch": 0, "pos": 4, "removed": [2]}, {"epoch": 2, "pos": 0}]}
    assert data_position({"stream": pools, "weight_version": 3}) == [(0, 4), (2, 0)]
    assert data_position({"weight_version": 3}) == []
    assert data_position(None) == []


def test_describe_rows():
    assert describe_rows([(0, 4)], [(0, 8)]) == "data rows: epoch 0 positions 4..7"
    assert describe_rows([(0, 62)], [(1, 2)]) == (
        "data rows: epoch 0 position 62 to epoch 1 position 1"
    )
    assert describe_rows([(0, 4), (0, 0)], [(0, 4), (0, 3)]) == "data rows: epoch 0 positions 0..2"
    assert describe_rows([], [(0, 8)]) == "data position now epoch 0 position 8"
    assert describe_rows([], []) == "no data position known"


def _bad(step: int) -> BadStep:
    return BadStep(step, True, False, f"data rows: epoch 0 positions {step}..{step}")


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_limit_is_the_bad_steps_tolerated_in_a_row(tmp_path, limit):
    steps = BadSteps(limit, tmp_path)
    start = Snapshot({"step": 4}, {})
    stops = [steps.bad(_bad(5 + i), start if i == 0 else None, 0) for i in range(limit + 1)]
    assert stops == [False] * limit + [True]
    assert steps.before_streak is start and steps.total == limit + 1
    rows = [json.loads(x) for x in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 6 + limit))
    assert [r["in_a_row"] for r in rows] == list(range(1, limit + 2))


def test_a_good_step_ends_the_streak(tmp_path):
    steps = BadSteps(1, tmp_path)
    assert not steps.bad(_bad(2), None, 0)
    steps.good()
    assert not steps.bad(_bad(4), None, 0)  # one in a row again
    assert steps.bad(_bad(5), None, 0)
    assert steps.total == 3


def test_stop_message_names_the_first_bad_step_and_the_checkpoint(tmp_path):
    steps = BadSteps(1, tmp_path)
    steps.bad(_bad(3), Snapshot({"step": 2}, {}), 0)
    steps.bad(_bad(4), Snapshot({"step": 3}, {}), 0)
    text = steps.stop_message(tmp_path / "c", pre_state=steps.before_streak is not None)
    assert text.startswith(
        "2 bad steps in a row (steps 3-4; train.max_bad_steps=1 allows 1), the first at step 3: "
        "non-finite loss, data rows: epoch 0 positions 3..3; checkpoint from before step 3: "
    )
    assert f"(continue with train.resume={tmp_path / 'c'};" in text and "\n" not in text


def test_an_update_applied_before_the_bad_one_drops_the_start_state(tmp_path):
    """PPO epochs: update 1 applied, update 2 bad: the engine is no longer at the step's start."""
    steps = BadSteps(0, tmp_path)
    assert steps.bad(_bad(3), Snapshot({"step": 2}, {}), applied=1)
    assert steps.before_streak is None
    assert "checkpoint after step 3: " in steps.stop_message(tmp_path / "c", pre_state=False)
