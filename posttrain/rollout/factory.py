"""Building a run's rollout side from its Config: the engine (in-process vLLM, one replica per
rank, vLLM servers or transformers) and the `RolloutSource` (prompts, checked rewards, engine;
wrapped for async prefetch when `rollout.max_staleness > 0`)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from posttrain.config import Config
from posttrain.data.chat import encode_prompts, render_prompt
from posttrain.data.curriculum import load_stage_rows
from posttrain.data.splits import load_train_eval_rows
from posttrain.envs.runs import env_factory, env_rows
from posttrain.errors import ConfigError
from posttrain.models import load_policy
from posttrain.rollout import make_engine
from posttrain.rollout.async_source import AsyncRolloutSource
from posttrain.rollout.episode_source import EpisodeSource
from posttrain.rollout.guide import check_hints
from posttrain.rollout.server_ranks import RankedServerEngine, make_server_engine
from posttrain.rollout.sharded import (
    EpisodeShards,
    ShardedEngine,
    group_all_gather,
    make_vllm_replica,
)
from posttrain.rollout.source import RolloutSource, SampleSource
from posttrain.runtime import distributed as dist
from rewards.registry import TOKEN_ENTROPY, RewardConfigError, get_reward
from rewards.startup import validate_rewards


def check_rewards(cfg: Config, rows: list[dict]) -> None:
    """Fail before training on any reward problem (name, column, kwarg, rubric, judge server)."""
    if not cfg.rewards and cfg.env.name is not None:
        return  # the environment scores its episodes (EpisodeSource checks where it does not)
    col = cfg.data.prompt_column
    columns = {k: [row.get(k) for row in rows] for k in (rows[0] if rows else {}) if k != col}
    # The sampling algorithms compute the policy's token entropy for rewards that need it (RENT).
    supplied = (TOKEN_ENTROPY,) if cfg.train.algorithm in ("grpo", "rebel", "online_dpo") else ()
    try:
        validate_rewards(cfg.rewards, columns, model_columns=supplied)
    except ValueError as err:
        raise ConfigError(f"rewards: {err}") from None


def check_prompts(cfg: Config, tokenizer: Any, train: list[list[dict]], held: list[dict]) -> None:
    """Fail before training on a prompt longer than `data.max_prompt_tokens` (not at the step
    that first draws it), and on an `eval.reward` that is not a registered reward.

    Args:
        train: the training rows (one list per curriculum stage).
        held: the held-out rows (the first `eval.num_problems` are evaluated).
    """
    render_prompt(tokenizer, "1+1")  # a tokenizer without a chat template: its own error
    col = cfg.data.prompt_column
    named = [("training data", rows) for rows in train]
    named.append(("held-out data", held[: cfg.eval.num_problems]))
    for what, rows in named:
        try:
            encode_prompts(
                tokenizer,
                [r[col] for r in rows],
                cfg.data.system_prompt,
                cfg.data.max_prompt_tokens,
            )
        except ConfigError as err:
            raise ConfigError(f"{what}: {err}") from None
    if cfg.eval.num_problems > 0 or cfg.rollout.history_resampling:
        try:
            get_reward(cfg.eval.reward)
        except (RewardConfigError, ImportError) as err:
            raise ConfigError(f"eval.reward: {err}") from None


def make_rollout_engine(cfg: Config, model_path: str, tokenizer: Any) -> Any:
    """The configured rollout engine on `model_path` (vLLM in-process, or transformers)."""
    r = cfg.rollout
    if r.engine == "vllm":
        kw: dict[str, Any] = {
            "max_model_len": max_model_len(cfg),
            "seed": cfg.train.seed,
            "kv_cache_gib": r.kv_cache_gib,
            **({"block_size": r.kv_block_size} if r.kv_block_size else {}),
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
        kw["seed"] = cfg.train.seed + dist.rank()
        replica = make_vllm_replica(model_path, **kw)
        return ShardedEngine(replica, dist.rank(), dist.world_size(), dist.all_gather_object)
    if r.engine == "server":
        return _make_server_engine(cfg, model_path, tokenizer)
    model = load_policy(model_path, dtype=cfg.model.dtype).to(dist.device())
    return make_engine("hf", model_path, model=model, tokenizer=tokenizer)


def _make_server_engine(cfg: Config, model_path: str, tokenizer: Any) -> Any:
    """`rollout.engine=server`: vLLM server process(es) at `rollout.server_url`.

    The servers are reloaded from `model_path` (a local directory) so that version 0 is the
    run's starting point, whatever an earlier run left in them. With several ranks each samples
    its block of the prompts and rank 0 alone pushes weights (posttrain/rollout/server_ranks.py).
    """
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


def max_model_len(cfg: Config) -> int:
    """The longest sequence the engine holds: prompt + completion (+ an episode's later turns)."""
    extra = cfg.env.max_episode_tokens if cfg.env.name is not None else 0
    return cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens + extra


def _server_block(
    engine: RankedServerEngine, prompt_ids: list[list[int]], sampling: Any, first_index: int
) -> list:
    """A block of a larger call on this rank's server engine (rank 0 checks the servers'
    weights first, as `RankedServerEngine.generate` does)."""
    if engine.rank == 0 and engine.verify_weights:
        engine.engine.check_versions()
    return engine.engine.generate(prompt_ids, sampling, first_index=first_index)


def episode_shards(engine: Any) -> EpisodeShards | None:
    """How the ranks split a step's episodes: by whole groups where each rank's engine samples
    any block of a call with the call's per-prompt seeds (a vLLM replica per rank, or vLLM
    servers); None with one rank or the `hf` engine (every rank plays every episode).

    Collective: every rank calls it at the same point (it makes the episodes' gloo group).
    """
    if dist.world_size() == 1:
        return None
    if isinstance(engine, ShardedEngine):
        block: Any = engine.generate_block
    elif isinstance(engine, RankedServerEngine):
        block = partial(_server_block, engine)
    else:
        return None
    gather = group_all_gather(torch.distributed.new_group(backend="gloo"))
    return EpisodeShards(block, dist.rank(), dist.world_size(), gather)


def make_episode_source(cfg: Config, model_path: str, tokenizer: Any) -> SampleSource:
    """Multi-turn episodes of `env.name` (rewards checked against the task rows); under torchrun
    split over the ranks by whole groups (`episode_shards`)."""
    train, held = env_rows(cfg)
    check_rewards(cfg, train)
    factory = env_factory(cfg)
    engine = make_rollout_engine(cfg, model_path, tokenizer)
    shards = episode_shards(engine)
    source = EpisodeSource(cfg, tokenizer, engine, train, held, factory, shards)
    if cfg.rollout.max_staleness > 0:
        return AsyncRolloutSource(source, cfg.rollout.max_staleness, cfg.train.steps)
    return source


def make_rollout_source(cfg: Config, model_path: str, tokenizer: Any) -> SampleSource:
    """Prompts (and curriculum stages), checked rewards and a rollout engine: a RolloutSource
    (an EpisodeSource when `env.name` names a multi-turn environment)."""
    if cfg.env.name is not None:
        return make_episode_source(cfg, model_path, tokenizer)
    train, held = load_train_eval_rows(cfg)
    stages = load_stage_rows(cfg)  # SRPO curriculum: [] without data.stages
    for rows in stages or [train]:
        check_rewards(cfg, rows)
    check_prompts(cfg, tokenizer, stages or [train], held)
    if cfg.guide.enabled:  # every training row can be hinted, and fits the engine's context
        check_hints(cfg, tokenizer, stages or [train])
    rollout = make_rollout_engine(cfg, model_path, tokenizer)
    source = RolloutSource(cfg, tokenizer, rollout, train, held, stages)
    if cfg.rollout.max_staleness > 0:  # generate step n+1 while step n trains
        return AsyncRolloutSource(source, cfg.rollout.max_staleness, cfg.train.steps)
    return source
