"""Multi-turn environments: one explicit registry from name to `"module:Class"`, imported lazily.

Chosen in YAML as `env: {name, kwargs}`. `name` is a registered name (see `ENVIRONMENTS`) or the
import path of a user's own class, `"pkg.module:Class"`; `kwargs` go to its constructor. Each
episode gets a fresh instance (`environment_factory`), which holds that episode's state.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from posttrain.envs.base import CALL_OUTCOMES, Environment, StepResult, ToolCall, Turn
from posttrain.errors import ConfigError, did_you_mean

__all__ = [
    "CALL_OUTCOMES",
    "ENVIRONMENTS",
    "Environment",
    "StepResult",
    "ToolCall",
    "Turn",
    "environment_class",
    "environment_factory",
    "make_environment",
]

# name -> "module:Class". Keep sorted; no import magic.
ENVIRONMENTS: dict[str, str] = {
    "calculator": "posttrain.envs.calculator:CalculatorEnv",
    "calculator_expression": "posttrain.envs.calculator:CalculatorExpressionEnv",
    "code_feedback": "posttrain.envs.code_feedback:CodeFeedbackEnv",
    "guess_number": "posttrain.envs.guess_number:GuessNumberEnv",
}


def environment_class(name: str) -> type:
    """The class registered under `name`, or at the import path `"pkg.module:Class"`.

    Raises:
        ConfigError: unknown name (naming the closest registered one), or an import path whose
            module / attribute cannot be loaded or is not a class.
    """
    target = ENVIRONMENTS.get(name)
    if target is None:
        if ":" not in name:
            hint = did_you_mean(name, sorted(ENVIRONMENTS))
            raise ConfigError(
                f"env.name={name!r} is not a registered environment{hint} (or give the import "
                "path of your own class, 'pkg.module:Class')"
            )
        target = name
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"env.name={name!r}: cannot import module {module_name!r}: {e}") from e
    cls = getattr(module, attr, None)
    if not inspect.isclass(cls):
        raise ConfigError(f"env.name={name!r}: {module_name} has no class {attr!r}")
    return cls


def environment_factory(
    name: str, kwargs: dict[str, Any] | None = None
) -> Callable[[], Environment]:
    """A zero-argument callable making a fresh environment (one per episode).

    The class is resolved and `kwargs` are checked against its constructor now, so a mistake
    fails at start-up, not at the first episode.

    Args:
        name: a registered name or `"pkg.module:Class"`.
        kwargs: constructor keyword arguments (copied for every instance).

    Returns:
        `make() -> Environment`.

    Raises:
        ConfigError: unknown name, unloadable class, or kwargs its constructor does not take.
    """
    cls = environment_class(name)
    kwargs = dict(kwargs or {})
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"env.kwargs for {name!r}: {e}") from e
    except ValueError:  # no introspectable signature: the first instance will tell
        pass

    def make() -> Environment:
        env = cls(**copy.deepcopy(kwargs))
        if not isinstance(env, Environment):
            needs = ("tools", "reset", "step", "final_reward")
            missing = [m for m in needs if not hasattr(env, m)]
            raise ConfigError(
                f"env.name={name!r}: {cls.__name__} is not an Environment (missing: "
                f"{', '.join(missing)}); see posttrain/envs/base.py"
            )
        return env

    return make


def make_environment(name: str, kwargs: dict[str, Any] | None = None) -> Environment:
    """One environment instance (one episode); see `environment_factory`."""
    return environment_factory(name, kwargs)()
