"""A short run of every method recipe in recipes/, as shipped (only sizes shrunk).

Each recipe runs through the Python API with its own algorithm, estimator, rewards and options,
on the session's tiny model with a 2-step SFT warm-up, 2 RL steps and a small held-out eval.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.trainer import Trainer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
METHOD_RECIPES = ["ppo_tiny", "rebel_tiny", "opo_tiny", "empg_tiny", "rent_tiny"]


@pytest.mark.parametrize("name", METHOD_RECIPES)
def test_method_recipe_short_run(tmp_path, tiny_model_dir, name):
    recipe = ROOT / "recipes" / f"{name}.yaml"
    cfg = load_config(
        recipe,
        [
            f"model.path={tiny_model_dir}",
            f"train.output_dir={tmp_path / name}",
            "warmup.steps=2",
            "train.steps=2",
            "train.eval_every=0",
            "data.train_size=64",
            "data.eval_size=4",
            "eval.num_problems=4",
            "eval.seeds=[0]",
            "log.wandb=disabled",
            "log.progress=false",
        ],
    )
    history = Trainer(cfg).train()
    assert len(history) == 2
    # Two optimizer steps, two syncs: the rollout engine holds the trained weights.
    assert history[-1]["weight_version"] == 2.0
    assert all(math.isfinite(m["loss"]) for m in history)
    out = tmp_path / name
    assert (out / "checkpoints" / "final" / "model.safetensors").is_file()
    assert (out / "eval.json").is_file()
