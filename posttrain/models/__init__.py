"""Models: loading policies and references, the offline tiny model, the actor-critic (PPO) and
reward-model (scalar head) wrappers, and no-grad forward passes (log-probs, entropies)."""

from posttrain.models.loading import (
    DTYPES,
    load_policy,
    load_reference,
    load_tokenizer,
    resolve_model_path,
)
from posttrain.models.tiny import build_tokenizer, make_tiny

__all__ = [
    "DTYPES",
    "build_tokenizer",
    "load_policy",
    "load_reference",
    "load_tokenizer",
    "make_tiny",
    "resolve_model_path",
]
