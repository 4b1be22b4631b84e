"""Retention of periodic checkpoints (`train.keep_checkpoints`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.runtime import checkpoint


def _ckpt(root: Path, name: str, step: int, complete: bool = True) -> Path:
    path = root / name
    path.mkdir(parents=True)
    if complete:
        (path / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_prune_keeps_the_newest_complete_step_checkpoints(tmp_path: Path) -> None:
    # names sort differently from steps on purpose: the step in trainer_state.json decides
    steps = {"step-000900": 900, "step-001000": 1000, "step-000100": 100, "step-010000": 10000}
    for name, step in steps.items():
        _ckpt(tmp_path, name, step)
    _ckpt(tmp_path, "final", 10001)
    _ckpt(tmp_path, "interrupted-step-5", 5)
    _ckpt(tmp_path, "step-020000.tmp", 20000)  # a save in progress
    _ckpt(tmp_path, "step-000050", 50, complete=False)  # not a checkpoint yet: left alone

    deleted = checkpoint.prune(tmp_path, keep=2)

    assert [p.name for p in deleted] == ["step-000100", "step-000900"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [
        "final",
        "interrupted-step-5",
        "step-000050",
        "step-001000",
        "step-010000",
        "step-020000.tmp",
    ]
    assert checkpoint.latest(tmp_path).name == "final"
    assert checkpoint.prune(tmp_path, keep=0) == []  # 0 keeps everything
    assert checkpoint.prune(tmp_path, keep=2) == []  # nothing more to delete


def test_checkpoint_settings_are_validated() -> None:
    cfg = load_config("recipes/quickstart.yaml")
    assert (cfg.train.save_every, cfg.train.keep_checkpoints) == (500, 2)
    with pytest.raises(ConfigError, match=r"train\.keep_checkpoints"):
        load_config("recipes/quickstart.yaml", ["train.keep_checkpoints=-1"])
    with pytest.raises(ConfigError, match=r"train\.save_every"):
        load_config("recipes/quickstart.yaml", ["train.save_every=-5"])
