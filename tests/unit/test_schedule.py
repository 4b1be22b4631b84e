"""Learning-rate schedule: warm-up then cosine/linear/constant, checked by hand."""

import math

import pytest

from posttrain.trainer import lr_multiplier


def test_warmup_is_linear():
    assert [
        lr_multiplier(s, warmup=4, total=10, schedule="constant", min_ratio=0.0) for s in range(5)
    ] == [
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
    ]


def test_cosine_endpoints_and_midpoint():
    f = lambda s: lr_multiplier(s, warmup=2, total=12, schedule="cosine", min_ratio=0.1)  # noqa: E731
    assert f(2) == pytest.approx(1.0)
    assert f(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(12) == pytest.approx(0.1)


def test_linear_decay():
    f = lambda s: lr_multiplier(s, warmup=0, total=10, schedule="linear", min_ratio=0.0)  # noqa: E731
    assert [round(f(s), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]


def test_loss_below_averages_the_last_window_of_full_steps():
    from posttrain.runtime.schedule import loss_below

    rows = [{"loss": v} for v in [1.0] * 5 + [0.1] * 9]
    assert not loss_below(rows, None)  # no threshold: never stops
    assert not loss_below(rows[:9], 10.0, window=10)  # fewer steps than the window
    # last 10: one 1.0 and nine 0.1 -> mean 0.19
    assert not loss_below(rows, 0.19) and loss_below(rows, 0.1901)
    assert loss_below([*rows, {"loss": 0.1}], 0.1001)  # the 1.0 left the window: mean 0.1
    assert not loss_below([{"reward": 0.0}] * 10, 5.0)  # no loss rows (an RL metric) -> no stop
