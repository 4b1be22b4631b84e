"""Algorithms, registered in one explicit dict. Each builder returns an `Algorithm`."""

from __future__ import annotations

from typing import Any

from posttrain import distributed as dist
from posttrain.config import Config
from posttrain.data.loading import load_rows
from posttrain.errors import ConfigError


def load_train_eval_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """Training rows and held-out rows for a run."""
    d = cfg.data
    train = load_rows(
        d.source,
        prompt_column=d.prompt_column,
        split="train",
        n=d.train_size,
        seed=d.seed,
        task_kwargs=d.task if d.source == "arithmetic" else None,
    )
    eval_source = d.eval_source or d.source
    held = load_rows(
        eval_source,
        prompt_column=d.prompt_column,
        split="test",
        n=d.eval_size,
        seed=d.seed,
        task_kwargs=d.task if eval_source == "arithmetic" else None,
    )
    return train, held


def check_rewards(cfg: Config, rows: list[dict]) -> None:
    """Fail before training on any reward problem (name, column, kwarg, rubric, judge server)."""
    from rewards.startup import validate_rewards

    col = cfg.data.prompt_column
    columns = {k: [row.get(k) for row in rows] for k in (rows[0] if rows else {}) if k != col}
    try:
        validate_rewards(cfg.rewards, columns)
    except ValueError as err:
        raise ConfigError(f"rewards: {err}") from None


def make_rollout_engine(cfg: Config, model_path: str, tokenizer: Any) -> Any:
    """The configured rollout engine on `model_path` (vLLM in-process, or transformers)."""
    from posttrain.rollout import make_engine

    r = cfg.rollout
    if r.engine == "vllm":
        if dist.world_size() > 1:
            raise ConfigError(
                "rollout.engine=vllm runs in a single process for now; use rollout.engine=hf "
                "for multi-process runs"
            )
        return make_engine(
            "vllm",
            model_path,
            max_model_len=cfg.data.max_prompt_tokens + r.max_new_tokens,
            seed=cfg.train.seed,
            kv_cache_gib=r.kv_cache_gib,
            gpu_memory_utilization=r.gpu_memory_utilization,
        )
    from posttrain.models import load_policy

    model = load_policy(model_path, dtype=cfg.model.dtype).to(dist.device())
    return make_engine("hf", model_path, model=model, tokenizer=tokenizer)


def _build_grpo(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> Any:
    from posttrain.algorithms.grpo import GRPO
    from posttrain.algorithms.rollout_batch import RolloutSource
    from posttrain.models import load_reference

    train, held = load_train_eval_rows(cfg)
    check_rewards(cfg, train)
    rollout = make_rollout_engine(cfg, model_path, tokenizer)
    source = RolloutSource(cfg, tokenizer, rollout, train, held)
    ref = None
    if cfg.kl.coef > 0:
        ref = load_reference(cfg.model.ref_path or model_path, dtype=cfg.model.dtype)
        ref = ref.to(dist.device())
    return GRPO(cfg, source, ref)


def _build_sft(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> Any:
    from posttrain.algorithms.sft import SFT

    train, _ = load_train_eval_rows(cfg)
    return SFT(cfg, tokenizer, train)


def _build_dpo(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> Any:
    from posttrain.algorithms.dpo import build_dpo

    return build_dpo(cfg, model_path, tokenizer, engine)


def _build_reward_model(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> Any:
    from posttrain.algorithms.reward_model import build_reward_model

    return build_reward_model(cfg, model_path, tokenizer, engine)


ALGORITHMS = {"grpo": _build_grpo, "sft": _build_sft}
ALGORITHMS["dpo"] = _build_dpo
ALGORITHMS["reward_model"] = _build_reward_model


def _load_reward_model(
    path: str, dtype: str, gradient_checkpointing: bool = False, lora: Any = None
) -> Any:
    from posttrain.algorithms.reward_model import load_reward_model

    return load_reward_model(path, dtype, gradient_checkpointing, lora)


# Which model class an algorithm trains, when not a causal LM (the default, `load_policy`).
# Each loader takes (path, dtype, gradient_checkpointing, lora) like `models.load_policy`.
MODEL_LOADERS: dict[str, Any] = {"reward_model": _load_reward_model}


def model_loader(algorithm: str) -> Any:
    """The function the trainer uses to load the trained model of `algorithm`."""
    from posttrain.models import load_policy

    return MODEL_LOADERS.get(algorithm, load_policy)


def build_algorithm(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> Any:
    """Look up `train.algorithm` and build it."""
    name = cfg.train.algorithm
    if name not in ALGORITHMS:
        raise ConfigError(f"train.algorithm: {name!r} is not one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name](cfg, model_path, tokenizer, engine)
