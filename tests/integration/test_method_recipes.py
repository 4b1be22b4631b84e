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
from tests.tiny_runs import RECIPE_SHORT_RUN

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
METHOD_RECIPES = ["ppo_tiny", "rebel_tiny", "opo_tiny", "empg_tiny", "rent_tiny", "online_dpo_tiny"]

# online_dpo_tiny: after a 2-step warm-up every sample of a prompt scores 0 (no pair at step 1)
EXTRA = {"online_dpo_tiny": ["warmup.steps=40"]}


@pytest.mark.parametrize("name", METHOD_RECIPES)
def test_method_recipe_short_run(tmp_path, tiny_model_dir, name):
    recipe = ROOT / "recipes" / f"{name}.yaml"
    cfg = load_config(
        recipe,
        [
            f"model.path={tiny_model_dir}",
            f"train.output_dir={tmp_path / name}",
            *RECIPE_SHORT_RUN,
            *EXTRA.get(name, []),
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
    if name == "online_dpo_tiny":
        _check_online_dpo(history, cfg.dpo.nll_coef)


ONLINE_DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "margin",
    "accuracy",
    "rollout/accuracy",
    "pairs/used",
    "pairs/skipped_ties",
    "reward/total/mean",
)


def _check_online_dpo(history: list[dict], nll_coef: float) -> None:
    """Metrics logged; step 1 (policy == reference) has h = 0: loss log(2) (+ nll term)."""
    for m in history:
        assert all(k in m for k in ONLINE_DPO_METRICS), sorted(m)
    first = history[0]
    assert first["pairs/used"] > 0
    assert first["pairs/used"] + first["pairs/skipped_ties"] + first["pairs/skipped_invalid"] == 16
    expected = math.log(2.0) + (nll_coef * first["nll"] if nll_coef else 0.0)
    assert first["loss"] == pytest.approx(expected, abs=1e-4)
    assert abs(first["margin"]) < 1e-4
