"""Algorithms, registered in one explicit dict. Each builder returns an `Algorithm`."""

from __future__ import annotations

import functools
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
    return train, load_eval_rows(cfg)


def load_eval_rows(cfg: Config) -> list[dict]:
    """The held-out rows: `data.eval_source` (or `data.source`), split `test`, `eval_size` rows."""
    d = cfg.data
    eval_source = d.eval_source or d.source
    return load_rows(
        eval_source,
        prompt_column=d.prompt_column,
        split="test",
        n=d.eval_size,
        seed=d.seed,
        task_kwargs=d.task if eval_source == "arithmetic" else None,
    )


def check_rewards(cfg: Config, rows: list[dict]) -> None:
    """Fail before training on any reward problem (name, column, kwarg, rubric, judge server)."""
    from rewards.registry import TOKEN_ENTROPY
    from rewards.startup import validate_rewards

    col = cfg.data.prompt_column
    columns = {k: [row.get(k) for row in rows] for k in (rows[0] if rows else {}) if k != col}
    # The sampling algorithms compute the policy's token entropy for rewards that need it (RENT).
    supplied = (TOKEN_ENTROPY,) if cfg.train.algorithm in ("grpo", "rebel", "online_dpo") else ()
    try:
        validate_rewards(cfg.rewards, columns, model_columns=supplied)
    except ValueError as err:
        raise ConfigError(f"rewards: {err}") from None


def make_rollout_engine(cfg: Config, model_path: str, tokenizer: Any) -> Any:
    """The configured rollout engine on `model_path` (vLLM in-process, or transformers)."""
    from posttrain.rollout import make_engine

    r = cfg.rollout
    if r.engine == "vllm":
        kw: dict[str, Any] = {
            "max_model_len": cfg.data.max_prompt_tokens + r.max_new_tokens,
            "seed": cfg.train.seed,
            "kv_cache_gib": r.kv_cache_gib,
            "gpu_memory_utilization": r.gpu_memory_utilization,
            "sleep_level": r.sleep_level,
            "max_concurrent_seqs": max(
                1, r.prompts_per_step * r.samples_per_prompt // dist.world_size()
            ),
        }
        if cfg.model.lora.sync == "adapter":  # serve the trained LoRA adapter, not merged weights
            kw["lora_rank"] = cfg.model.lora.r
            kw["lora_targets"] = cfg.model.lora.target_modules
        if dist.world_size() == 1:
            return make_engine("vllm", model_path, **kw)
        # One colocated vLLM replica per rank; each samples a block of the step's prompts with
        # per-prompt seeds and the rollouts are all-gathered (posttrain/rollout/sharded.py).
        # The engine seed only matters for unseeded sampling: replicas must not repeat it.
        from posttrain.rollout.sharded import ShardedEngine, make_vllm_replica

        kw["seed"] = cfg.train.seed + dist.rank()
        replica = make_vllm_replica(model_path, **kw)
        return ShardedEngine(replica, dist.rank(), dist.world_size(), dist.all_gather_object)
    if r.engine == "server":
        return _make_server_engine(cfg, model_path, tokenizer)
    from posttrain.models import load_policy

    model = load_policy(model_path, dtype=cfg.model.dtype).to(dist.device())
    return make_engine("hf", model_path, model=model, tokenizer=tokenizer)


def _make_server_engine(cfg: Config, model_path: str, tokenizer: Any) -> Any:
    """`rollout.engine=server`: vLLM server process(es) at `rollout.server_url`.

    The servers are reloaded from `model_path` (a local directory) so that version 0 is the
    run's starting point, whatever an earlier run left in them. With several ranks each samples
    its block of the prompts and rank 0 alone pushes weights (posttrain/rollout/server_ranks.py).
    """
    from pathlib import Path

    from posttrain.rollout.server_ranks import make_server_engine

    r = cfg.rollout
    weights_dir = r.server_weights_dir or str(Path(cfg.train.output_dir) / "rollout-weights")
    return make_server_engine(
        r.server_url,
        model_path=model_path,
        rank=dist.rank(),
        world=dist.world_size(),
        weights_dir=weights_dir,
        timeout_s=r.server_timeout_s,
        tokenizer=tokenizer,
        weight_transfer=r.server_weight_transfer,
        nccl_address=r.server_nccl_address,
        nccl_port=r.server_nccl_port,
    )


def make_rollout_source(cfg: Config, model_path: str, tokenizer: Any) -> Any:
    """Prompts (and curriculum stages), checked rewards and a rollout engine: a RolloutSource."""
    from posttrain.algorithms.rollout_batch import RolloutSource
    from posttrain.data.curriculum import load_stage_rows

    train, held = load_train_eval_rows(cfg)
    stages = load_stage_rows(cfg)  # SRPO curriculum: [] without data.stages
    for rows in stages or [train]:
        check_rewards(cfg, rows)
    rollout = make_rollout_engine(cfg, model_path, tokenizer)
    source = RolloutSource(cfg, tokenizer, rollout, train, held, stages)
    if cfg.rollout.max_staleness > 0:  # generate step n+1 while step n trains
        from posttrain.algorithms.async_rollout import AsyncRolloutSource

        return AsyncRolloutSource(source, cfg.rollout.max_staleness, cfg.train.steps)
    return source


def _build_grpo(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> Any:
    from posttrain.algorithms.grpo import GRPO
    from posttrain.models import load_reference

    source = make_rollout_source(cfg, model_path, tokenizer)
    ref = None
    if cfg.kl.coef > 0:
        ref = load_reference(cfg.model.ref_path or model_path, dtype=cfg.model.dtype)
        ref = ref.to(dist.device())
    return GRPO(cfg, source, ref)


def _build_rebel(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> Any:
    from posttrain.algorithms.rebel import Rebel

    return Rebel(cfg, make_rollout_source(cfg, model_path, tokenizer))


def _build_online_dpo(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> Any:
    from posttrain.algorithms.online_dpo import build_online_dpo

    return build_online_dpo(cfg, model_path, tokenizer, engine)


def _build_ppo(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> Any:
    from posttrain.algorithms.ppo import build_ppo

    return build_ppo(cfg, make_rollout_source(cfg, model_path, tokenizer), model_path, engine)


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
ALGORITHMS["ppo"] = _build_ppo
ALGORITHMS["rebel"] = _build_rebel
ALGORITHMS["online_dpo"] = _build_online_dpo


def _load_reward_model(
    path: str, dtype: str, gradient_checkpointing: bool = False, lora: Any = None, cfg: Any = None
) -> Any:
    from posttrain.algorithms.reward_model import load_reward_model

    return load_reward_model(path, dtype, gradient_checkpointing, lora)


def _load_actor_critic(
    path: str, dtype: str, gradient_checkpointing: bool = False, lora: Any = None, cfg: Any = None
) -> Any:
    from posttrain.algorithms.actor_critic import load_actor_critic

    return load_actor_critic(path, dtype, gradient_checkpointing, lora, cfg)


# Which model class an algorithm trains, when not a causal LM (the default, `load_policy`).
# Each loader takes (path, dtype, gradient_checkpointing, lora) like `models.load_policy`, plus
# the run Config as keyword `cfg` (None = defaults).
MODEL_LOADERS: dict[str, Any] = {"reward_model": _load_reward_model, "ppo": _load_actor_critic}


def model_loader(algorithm: str, cfg: Config | None = None) -> Any:
    """The function the trainer uses to load the trained model of `algorithm`.

    Args:
        algorithm: `train.algorithm`.
        cfg: the run Config, handed to registered loaders (e.g. PPO's `ppo.value_head`).
    """
    from posttrain.models import load_policy

    if algorithm not in MODEL_LOADERS:
        return load_policy
    return functools.partial(MODEL_LOADERS[algorithm], cfg=cfg)


def build_algorithm(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> Any:
    """Look up `train.algorithm` and build it."""
    name = cfg.train.algorithm
    if name not in ALGORITHMS:
        raise ConfigError(f"train.algorithm: {name!r} is not one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name](cfg, model_path, tokenizer, engine)
