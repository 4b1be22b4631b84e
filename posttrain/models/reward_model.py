"""The reward model: a scalar-head sequence classifier (num_labels=1) read at the last non-pad
token, loaded from a causal-LM or reward-model checkpoint (also the PPO critic)."""

from __future__ import annotations

from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.models.loading import DTYPES, load_tokenizer, resolve_model_path


def load_reward_model(
    path: str, dtype: str = "float32", gradient_checkpointing: bool = False, lora: Any = None
) -> Any:
    """Load a scalar-head sequence classifier (num_labels=1) in train mode.

    Args:
        path: local model directory or hub name (a causal LM checkpoint is fine: the score head
            is initialised fresh; an RM checkpoint keeps its head).
        dtype: "float32" | "bfloat16" | "float16".
        gradient_checkpointing: enable non-reentrant activation checkpointing.
        lora: `model.lora`; LoRA is not supported for reward models yet (r must be 0).

    Raises:
        ConfigError: the model cannot be loaded, LoRA is requested, or neither the model config
            nor the tokenizer names a pad token (needed to find the last non-pad token).
    """
    from transformers import AutoModelForSequenceClassification

    if lora is not None and getattr(lora, "r", 0) > 0:
        raise ConfigError(
            "model.lora is not supported for train.algorithm=reward_model (the new score head "
            "must train in full); set model.lora.r=0"
        )
    name = resolve_model_path(path, "model.path")
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r}: valid values are {sorted(DTYPES)}")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=1, dtype=DTYPES[dtype], output_loading_info=True
        )
    except OSError as exc:
        raise ConfigError(
            f"model.path {name!r} could not be loaded as a reward model: {exc}"
        ) from exc
    if any(k.startswith("score.") for k in info.get("missing_keys", ())):
        # a fresh head: std 1/sqrt(hidden + 1) (as TRL / InstructGPT value heads) instead of
        # initializer_range (0.02), so the body gets useful gradients from the first step
        hidden = model.score.weight.shape[1]
        with torch.no_grad():
            model.score.weight.normal_(0.0, 1.0 / (hidden + 1) ** 0.5)
    if model.config.pad_token_id is None:
        pad = load_tokenizer(name).pad_token_id
        if pad is None:
            raise ConfigError(f"model.path {name!r}: no pad token in the model config or tokenizer")
        model.config.pad_token_id = int(pad)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    return model


def rewards_of(outputs: Any) -> torch.Tensor:
    """[B] float32 scalar rewards from a sequence-classification output ([B, 1] logits)."""
    return outputs.logits.float().reshape(-1)
