"""Config loading: YAML + overrides, unknown keys, types, impossible values, every recipe."""

from pathlib import Path

import pytest

from posttrain.config import Config, load_config, parse_overrides, to_dict
from posttrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.advantage.estimator == "grpo"
    assert cfg.loss.aggregation == "token_mean"
    assert cfg.kl.estimator == "k3" and cfg.kl.coef == 0.0
    assert cfg.loss.tis_cap == 2.0


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.train.steps >= 0


def test_recipes_exist():
    assert (ROOT / "recipes" / "quickstart.yaml") in RECIPES


def test_overrides_parse_yaml_scalars():
    tree = parse_overrides(
        ["train.steps=3", "loss.dual_clip_c=3", "log.run_name=abc", "kl.coef=0.04"]
    )
    assert tree == {
        "train": {"steps": 3},
        "loss": {"dual_clip_c": 3},
        "log": {"run_name": "abc"},
        "kl": {"coef": 0.04},
    }
    cfg = load_config(None, ["train.steps=3", "loss.dual_clip_c=3", "kl.coef=0.04"])
    assert cfg.train.steps == 3 and cfg.loss.dual_clip_c == 3.0 and cfg.kl.coef == 0.04


def test_unknown_key_suggests_closest(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rollout:\n  samples_per_promt: 4\n")
    with pytest.raises(
        ConfigError, match=r"rollout\.samples_per_promt.*did you mean 'samples_per_prompt'"
    ):
        load_config(p)
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        load_config(None, ["optm.lr=1"])


def test_wrong_type_names_field():
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer, got 'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"rollout\.mask_truncated: expected true or false"):
        load_config(None, ["rollout.mask_truncated=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.samples_per_prompt=1", r"samples_per_prompt must be >= 2 for GRPO"),
        ("advantage.estimator=ppo", r"advantage\.estimator: 'ppo' is not one of grpo"),
        ("loss.aggregation=mean", r"loss\.aggregation: 'mean' is not one of"),
        ("train.micro_batch_size_per_device=5", r"micro_batch_size_per_device=5 must divide"),
        ("kl.estimator=k4", r"kl\.estimator"),
        ("loss.tis_cap=0.5", r"loss\.tis_cap must be >= 1"),
        ("model.path=/nonexistent/model", r"model\.path: directory /nonexistent/model does not"),
    ],
)
def test_impossible_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_rewards_list_and_roundtrip():
    cfg = load_config(None, ["rewards=[{name: exact_answer, weight: 2}, {name: format_number}]"])
    assert [r.name for r in cfg.rewards] == ["exact_answer", "format_number"]
    assert cfg.rewards[0].weight == 2.0
    again = load_config(None, [])
    assert to_dict(again)["rewards"][0]["name"] == "exact_answer"


def test_warmup_config_keeps_what_sft_reads_and_resets_the_rest():
    from posttrain.config import WarmupConfig, to_dict, warmup_config
    from posttrain.config.loading import WARMUP_INHERITS

    cfg = load_config(
        ROOT / "recipes" / "ppo_tiny.yaml",
        ["kl.coef=0.05", "data.system_prompt=Be brief.", "train.zero_stage=2", "eval.k=2"],
    )
    sub = warmup_config(cfg, "some/model", "out/sft-warmup")
    w = cfg.warmup
    assert sub.train.algorithm == "sft" and sub.model.path == "some/model"
    assert (sub.train.steps, sub.train.sft_batch_size) == (w.steps, w.batch_size)
    assert (sub.optim.lr, sub.optim.warmup_steps) == (w.lr, w.warmup_steps)
    assert sub.train.output_dir == "out/sft-warmup" and sub.train.save_every == 0
    assert sub.warmup == WarmupConfig()  # no warm-up of the warm-up
    assert sub.data == cfg.data and sub.sft == cfg.sft and sub.log == cfg.log
    assert sub.train.zero_stage == 2 and sub.optim.beta2 == cfg.optim.beta2
    default = Config()
    for section in [f for f in to_dict(cfg) if f not in WARMUP_INHERITS and f != "warmup"]:
        assert getattr(sub, section) == getattr(default, section), section


def test_warmup_train_size_is_a_prefix_of_the_rl_rows():
    from posttrain.config import warmup_config
    from posttrain.data.splits import load_train_eval_rows

    cfg = load_config(ROOT / "recipes" / "quickstart.yaml", [])
    assert cfg.warmup.train_size == 200
    sub = warmup_config(cfg, "some/model", "out/sft-warmup")
    assert sub.data.train_size == 200 and cfg.data.train_size == 2000
    rl_rows, rl_eval = load_train_eval_rows(cfg)
    warm_rows, warm_eval = load_train_eval_rows(sub)
    assert warm_rows == rl_rows[:200] and warm_eval == rl_eval
    assert sub.train.stop_loss is None
    stopping = warmup_config(load_config(None, ["warmup.stop_loss=0.1"]), "m", "out")
    assert stopping.train.stop_loss == 0.1 and stopping.train.algorithm == "sft"
    for bad, match in [
        ("warmup.stop_loss=0", r"warmup\.stop_loss=0\.0 must be > 0"),
        (
            "train.stop_loss=0.1",
            r"train\.stop_loss=0\.1 must be > 0 and is for train\.algorithm=sft",
        ),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match=r"warmup\.train_size=0 must be >= 1"):
        load_config(ROOT / "recipes" / "quickstart.yaml", ["warmup.train_size=0"])
