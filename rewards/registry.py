"""Reward registry: one explicit dict from name to ``"module:function"``, imported lazily.

A reward is ``fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]``
where ``columns`` are the dataset's other fields (lists aligned with ``completions``). ``None``
means "cannot judge this sample": it is masked out of the loss and counted, never scored 0.

Built-in rewards are imported on first use, so a reward whose module (or optional dependency)
is missing never breaks ``import rewards``; it fails only when that reward is asked for.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import ConfigError

__all__ = [
    "MODEL_COLUMNS",
    "TOKEN_ENTROPY",
    "RewardConfigError",
    "RewardSpec",
    "available",
    "check_columns",
    "get_reward",
    "register",
    "required_columns",
]

RewardFn = Callable[..., Any]

# name -> "module:function". Keep sorted by module; no import magic.
_BUILTIN: dict[str, str] = {
    "math_answer": "rewards.math:math_answer",
    "exact_answer": "rewards.math:exact_answer",
    "format_number": "rewards.format:format_number",
    "think_answer_format": "rewards.format:think_answer_format",
    "length_in_range": "rewards.format:length_in_range",
    "regex_match": "rewards.format:regex_match",
    "json_valid": "rewards.structured:json_valid",
    "json_schema": "rewards.structured:json_schema",
    "ifeval": "rewards.ifeval:ifeval",
    "code_tests": "rewards.code:code_tests",
    "rubric": "rewards.rubric:rubric",
    "judge_verifier": "rewards.verifier:judge_verifier",
    "reward_model": "rewards.reward_model:reward_model",
    "neg_entropy": "rewards.entropy:neg_entropy",
    "box_iou": "rewards.grounding:box_iou",
}

# Arguments each built-in needs, from a dataset column or a RewardSpec kwarg of that name.
_BUILTIN_REQUIRED: dict[str, tuple[str, ...]] = {
    "math_answer": ("answer",),
    "exact_answer": ("answer",),
    "format_number": (),
    "think_answer_format": (),
    "length_in_range": (),
    "regex_match": ("pattern",),
    "json_valid": (),
    "json_schema": ("schema",),
    "ifeval": ("instructions",),
    "code_tests": ("tests",),
    "rubric": ("rubric", "base_url", "model"),
    "judge_verifier": ("answer", "base_url", "model"),
    "reward_model": ("path",),
    "neg_entropy": ("token_entropy",),
    "box_iou": ("box",),
}

# A required column another name can stand for: reward -> {column: the kwarg naming it}.
_BUILTIN_COLUMN_KWARGS: dict[str, dict[str, str]] = {"box_iou": {"box": "box_column"}}

# Columns no dataset has: the sampling algorithm computes them from the policy and adds them to
# the reward call (name -> what it is). A reward requiring one works only where it is supplied.
TOKEN_ENTROPY = "token_entropy"
MODEL_COLUMNS: dict[str, str] = {
    TOKEN_ENTROPY: "each completion's mean token entropy under the policy at the step's start",
}

_USER: dict[str, RewardFn] = {}
_USER_REQUIRED: dict[str, tuple[str, ...]] = {}
_LOADED: dict[str, RewardFn] = {}


class RewardConfigError(ConfigError):
    """A reward name, column or kwarg the user supplied is wrong (a ``ConfigError``/ValueError)."""


@dataclass(frozen=True)
class RewardSpec:
    """One reward in a composed reward.

    Attributes:
        name: Registry name (see ``available()``).
        weight: Multiplier in the weighted total.
        kwargs: Extra keyword arguments passed to the reward on every call (e.g. ``pattern``).
        timeout_s: Per-call timeout; ``None`` uses the timeout given to ``score``.
    """

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None


def available() -> list[str]:
    """Sorted names of every registered reward (built-in and user-registered)."""
    return sorted(set(_BUILTIN) | set(_USER))


def _unknown(name: str) -> RewardConfigError:
    names = available()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return RewardConfigError(f"unknown reward {name!r}; {hint}valid rewards: {', '.join(names)}")


def get_reward(name: str) -> RewardFn:
    """Return the reward function registered under ``name``.

    Raises:
        RewardConfigError: ``name`` is not registered (message lists the closest valid names).
        ImportError: the reward's module or one of its dependencies cannot be imported.
    """
    if name in _USER:
        return _USER[name]
    if name in _LOADED:
        return _LOADED[name]
    if name not in _BUILTIN:
        raise _unknown(name)
    module_name, _, attr = _BUILTIN[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(
            f"reward {name!r} lives in {module_name}, which failed to import: {e}"
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ImportError(f"reward {name!r}: {module_name} has no callable {attr!r}")
    _LOADED[name] = fn
    return fn


def register(
    name: str,
    fn: RewardFn,
    *,
    required: tuple[str, ...] | list[str] | None = None,
    overwrite: bool = False,
) -> RewardFn:
    """Register a user reward under ``name`` and return ``fn``.

    Args:
        name: Registry name; must not shadow an existing reward unless ``overwrite``.
        fn: ``fn(prompts, completions, **columns) -> list[float | None]``; sync or async.
        required: Columns the reward needs; default inferred from ``fn``'s parameters after
            ``prompts, completions`` that have no default value.
        overwrite: Allow replacing an existing name.
    """
    if not isinstance(name, str) or not name:
        raise RewardConfigError(f"reward name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise RewardConfigError(f"reward {name!r}: fn must be callable, got {type(fn).__name__}")
    if not overwrite and (name in _USER or name in _BUILTIN):
        raise RewardConfigError(
            f"reward {name!r} is already registered; pass overwrite=True or pick another name"
        )
    _USER[name] = fn
    _USER_REQUIRED[name] = tuple(required) if required is not None else _infer_required(fn)
    return fn


def unregister(name: str) -> None:
    """Remove a user-registered reward (built-ins cannot be removed)."""
    if name not in _USER:
        raise RewardConfigError(
            f"reward {name!r} is not user-registered; user rewards: {list(_USER)}"
        )
    del _USER[name]
    del _USER_REQUIRED[name]


def _infer_required(fn: RewardFn) -> tuple[str, ...]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return ()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(
        p.name for p in params[2:] if p.kind in named and p.default is inspect.Parameter.empty
    )


def required_columns(name: str, kwargs: dict[str, Any] | None = None) -> tuple[str, ...]:
    """Columns (or spec kwargs of the same name) the reward ``name`` needs; with the spec's
    ``kwargs``, a column a kwarg renames (``box_iou``'s ``box_column``) under its new name."""
    if name in _USER_REQUIRED:
        return _USER_REQUIRED[name]
    if name not in _BUILTIN_REQUIRED:
        raise _unknown(name)
    renames = _BUILTIN_COLUMN_KWARGS.get(name, {})
    chosen = {c: (kwargs or {}).get(k) for c, k in renames.items()}
    return tuple(
        chosen[c] if isinstance(chosen.get(c), str) else c for c in _BUILTIN_REQUIRED[name]
    )


def check_columns(specs: list[RewardSpec] | list[str], columns: dict[str, Any]) -> None:
    """Validate a dataset's columns against the rewards before training.

    Args:
        specs: Reward specs (or bare names).
        columns: Column name -> values (only the names are used here).

    Raises:
        RewardConfigError: unknown reward, a missing column, or a spec kwarg that collides with a
            column; the message names the reward and the column.
    """
    present = sorted(columns)
    for spec in specs:
        spec = RewardSpec(spec) if isinstance(spec, str) else spec
        for col in required_columns(spec.name, spec.kwargs):
            if col not in columns and col not in spec.kwargs:
                raise RewardConfigError(
                    f"reward {spec.name!r} needs {col!r} as a dataset column or a RewardSpec "
                    f"kwarg; columns present: {present}"
                )
        clash = sorted(set(spec.kwargs) & set(columns))
        if clash:
            raise RewardConfigError(
                f"reward {spec.name!r}: kwarg(s) {clash} collide with dataset column(s) of the "
                "same name; drop one of them"
            )
