"""An environment run from its Config: the task rows, a maker of fresh environments, and the SFT
warm-up's synthetic transcripts."""

from __future__ import annotations

import inspect
from typing import Any

from posttrain.config import Config
from posttrain.data.splits import load_train_eval_rows
from posttrain.envs import environment_class, environment_factory
from posttrain.envs.tools import ToolEnv, tool_schema
from posttrain.errors import ConfigError, did_you_mean


def env_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """An environment run's task rows: its built-in generator (`data.source: env`) or the data."""
    if cfg.data.source != "env":
        return load_train_eval_rows(cfg)
    make_rows = environment_class(cfg.env.name).make_rows
    d = cfg.data
    return (
        make_rows(d.train_size or 4000, seed=d.seed, split="train"),
        make_rows(d.eval_size, seed=d.seed, split="test"),
    )


def env_factory(cfg: Config) -> Any:
    """A zero-argument maker of fresh environments (`env.name`, `env.kwargs`, tool limits)."""
    e = cfg.env
    kwargs = dict(e.kwargs)
    if issubclass(environment_class(e.name), ToolEnv):
        kwargs.setdefault("tool_timeout_s", e.tool_timeout_s)
        kwargs.setdefault("tool_output_chars", e.tool_output_chars)
    return environment_factory(e.name, kwargs)


def transcript_rows(cfg: Config) -> list[dict[str, Any]]:
    """SFT rows of the environment's ideal conversations (`sft_transcripts` of its task rows):
    `{prompt: messages, tools: schemas}`, trained on every assistant turn."""
    cls = environment_class(cfg.env.name)
    train, _ = env_rows(cfg)
    tools = [tool_schema(fn) for fn in getattr(cls, "tools", [])]
    col = cfg.data.prompt_column
    kwargs = dict(cfg.env.transcript_kwargs)
    valid = [
        p.name
        for p in list(inspect.signature(cls.sft_transcripts).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    for key in kwargs:
        if key not in valid:
            raise ConfigError(
                f"env.transcript_kwargs.{key}: not an option of {cfg.env.name}'s sft_transcripts"
                + (did_you_mean(key, valid) if valid else " (it takes none)")
            )
    transcripts = cls.sft_transcripts(train, **kwargs)
    return [{col: messages, "tools": tools} for messages in transcripts]
