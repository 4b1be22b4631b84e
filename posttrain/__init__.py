"""posttrain: LLM post-training (GRPO family, SFT) on DeepSpeed with vLLM rollouts.

from posttrain import Trainer, load_config
Trainer(load_config("recipes/quickstart.yaml")).train()
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "Trainer", "load_config"]


def __getattr__(name: str) -> Any:
    # Lazy: `import posttrain` stays cheap; the trainer pulls in torch/deepspeed only when used.
    if name == "Trainer":
        from posttrain.trainer import Trainer

        return Trainer
    if name in ("load_config", "Config"):
        from posttrain import config

        return getattr(config, name)
    if name == "ConfigError":
        from posttrain.errors import ConfigError

        return ConfigError
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
