"""GRPO with `rollout.max_staleness` through the trainer (transformers engine, tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.algorithms.async_rollout import AsyncRolloutSource
from posttrain.algorithms.rollout_batch import RolloutSource
from posttrain.trainer import Trainer
from tests.tiny_runs import tiny_cfg

pytestmark = pytest.mark.slow

SAME_AT_STEP_ONE = ("loss", "reward/mean", "entropy", "grad_norm", "response_length/mean")


def _cfg(out: Path, model: Path, *extra: str):
    return tiny_cfg(
        out,
        model,
        "train.steps=3",
        "rollout.engine=hf",
        "rollout.samples_per_prompt=8",
        "data.train_size=32",
        *extra,
    )


def test_max_staleness_one_is_bounded_and_zero_is_synchronous(tmp_path, tiny_model_dir):
    sync = Trainer(_cfg(tmp_path / "sync", tiny_model_dir))
    assert type(sync.algorithm.source) is RolloutSource  # max_staleness=0: the old path
    sync_history = sync.train()

    lagged = Trainer(_cfg(tmp_path / "async", tiny_model_dir, "rollout.max_staleness=1"))
    assert isinstance(lagged.algorithm.source, AsyncRolloutSource)
    history = lagged.train()
    assert len(history) == 3 and (tmp_path / "async" / "checkpoints" / "final").is_dir()
    assert [m["rollout/staleness/max"] for m in history] == [0.0, 1.0, 1.0]
    assert all(m["rollout/staleness/max"] <= 1 for m in history)
    assert all(m["rollout/stale_regenerated"] == 0.0 for m in history)
    assert [m["weight_version"] for m in history] == [1.0, 2.0, 3.0]
    # Step 1 is sampled synchronously with the same seeds and weights in both runs.
    for key in SAME_AT_STEP_ONE:
        assert history[0][key] == sync_history[0][key], key
    assert history[0]["tis/mismatch_abs_mean"] < 1e-4
    # Later steps train on samples from the previous weights: where the step before changed
    # them, TIS sees the gap (the synchronous run has none).
    moved = [i for i in (1, 2) if history[i - 1]["grad_norm"] > 0]
    assert moved, "no optimizer step changed the weights: the test needs reward variance"
    for i in moved:
        assert history[i]["tis/mismatch_abs_mean"] > 1e-4
    assert all(m["tis/mismatch_abs_mean"] < 1e-4 for m in sync_history)
