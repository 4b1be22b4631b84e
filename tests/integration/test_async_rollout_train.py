"""GRPO with `rollout.max_staleness` through the trainer (transformers engine, tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.algorithms.async_rollout import AsyncRolloutSource
from posttrain.algorithms.rollout_batch import RolloutSource
from posttrain.config import load_config
from posttrain.trainer import Trainer

pytestmark = pytest.mark.slow

SAME_AT_STEP_ONE = ("loss", "reward/mean", "entropy", "grad_norm", "response_length/mean")


def _cfg(out: Path, model: Path, *extra: str):
    return load_config(
        None,
        [
            f"model.path={model}",
            f"train.output_dir={out}",
            "train.steps=3",
            "train.micro_batch_size_per_device=8",
            "rollout.engine=hf",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=8",
            "rollout.max_new_tokens=6",
            "data.train_size=32",
            "data.max_prompt_tokens=32",
            "eval.num_problems=0",
            "optim.lr=1e-3",
            "log.wandb=disabled",
            "log.progress=false",
            "rewards=[{name: length_in_range, kwargs: {max_chars: 5}}]",
            *extra,
        ],
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
