"""Algorithms, registered in one explicit dict: name -> `AlgorithmSpec`.

A spec says how to build the algorithm (an `Algorithm`, base.py), which model class it trains
(a causal LM unless it says otherwise) and how that model's parameters split into optimizer
groups. The trainer reads nothing else about an algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.algorithms.base import Algorithm
from posttrain.algorithms.dpo import build_dpo
from posttrain.algorithms.grpo import build_grpo
from posttrain.algorithms.online_dpo import build_online_dpo
from posttrain.algorithms.ppo import build_ppo
from posttrain.algorithms.rebel import build_rebel
from posttrain.algorithms.reward_model import build_reward_model
from posttrain.algorithms.sft import build_sft
from posttrain.config import Config
from posttrain.errors import ConfigError
from posttrain.models import load_policy, vlm
from posttrain.models.actor_critic import load_actor_critic
from posttrain.models.reward_model import load_reward_model

# build(cfg, model_path, tokenizer, engine) -> Algorithm; `engine` is the trained DeepSpeed engine
Builder = Callable[[Config, str, Any, Any], Algorithm]
# load(path, dtype, gradient_checkpointing, lora, cfg=...) -> the module the trainer optimises
ModelLoader = Callable[..., torch.nn.Module]


def trainable_parameters(model: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
    """One optimizer group: every parameter that requires grad, at the configured `lr`."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]


def actor_critic_groups(model: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
    """PPO: policy and critic groups (the critic at `ppo.critic_lr_multiplier` x lr)."""
    return model.optimizer_groups(lr)  # type: ignore[operator]


def _policy_loader(path: str, dtype: str, gradient_checkpointing: bool, lora: Any, cfg: Any):
    return load_policy(path, dtype, gradient_checkpointing, lora, cfg.model.freeze_vision)


def _reward_model_loader(path: str, dtype: str, gradient_checkpointing: bool, lora: Any, cfg: Any):
    return load_reward_model(path, dtype, gradient_checkpointing, lora)


@dataclass(frozen=True)
class AlgorithmSpec:
    """What the trainer needs to know about one algorithm.

    Attributes:
        build: makes the `Algorithm` the loop drives.
        load_model: loads the trained module from (path, dtype, gradient_checkpointing, lora,
            cfg): a causal LM, a scalar-head reward model or PPO's actor-critic.
        param_groups: splits the loaded module's trainable parameters into AdamW groups.
    """

    build: Builder
    load_model: ModelLoader = _policy_loader
    param_groups: Callable[[torch.nn.Module, float], list[dict[str, Any]]] = trainable_parameters


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "grpo": AlgorithmSpec(build_grpo),
    "sft": AlgorithmSpec(build_sft),
    "dpo": AlgorithmSpec(build_dpo),
    "reward_model": AlgorithmSpec(build_reward_model, load_model=_reward_model_loader),
    "ppo": AlgorithmSpec(build_ppo, load_model=load_actor_critic, param_groups=actor_critic_groups),
    "rebel": AlgorithmSpec(build_rebel),
    "online_dpo": AlgorithmSpec(build_online_dpo),
}


def algorithm_spec(name: str) -> AlgorithmSpec:
    """The registered spec of `train.algorithm`.

    Raises:
        ConfigError: `name` is not registered (naming the valid ones).
    """
    if name not in ALGORITHMS:
        raise ConfigError(f"train.algorithm: {name!r} is not one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def build_algorithm(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> Algorithm:
    """Look up `train.algorithm` and build it (a vision-language model: the options it takes,
    `models.vlm.check_vlm_config`)."""
    if vlm.processor_of(tokenizer) is not None:
        vlm.check_vlm_config(cfg, rolls_out=cfg.train.algorithm != "sft")
    return algorithm_spec(cfg.train.algorithm).build(cfg, model_path, tokenizer, engine)
