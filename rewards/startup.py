"""Start-up validation of a run's rewards: every problem found before the first step, in one error.

The reward boundary turns a misbehaving reward into ``None`` so a run never dies mid-way; the other
side of that promise is that configuration mistakes must not hide behind it (a typo'd judge option
would otherwise make every sample ``None`` for the whole run). ``validate_rewards`` is called once
before training (``posttrain.algorithms.check_rewards``) and raises one ``RewardConfigError``
listing, per reward:

- an unknown reward name (with the closest registered names) or a reward module that fails to
  import; a reward listed twice;
- a weight that is not a finite number, a ``timeout_s`` that is not positive;
- a required column that is neither a dataset column nor a spec kwarg; a kwarg that collides with a
  column; a policy-computed column (``token_entropy``) the caller does not supply; a kwarg the
  reward does not take (for rewards whose ``**_`` only swallows columns), or whose value does not
  fit the reward's annotation of it (``max_chars: ten`` for an ``int | None``);
- for the judge rewards (``rubric``, ``judge_verifier``, or ``functools.partial`` of them):
  ``base_url``/``model`` given per row instead of once, unknown or invalid judge options, an invalid
  ``aggregation``, a rubric (kwarg, file or any row of the ``rubric`` column) that ``parse_rubric``
  rejects, and a judge server that is unreachable, refuses the key or does not serve ``model``
  (``JudgeClient.check_reachable``; one request per distinct server and model).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from posttrain.errors import ConfigError
from rewards.registry import (
    MODEL_COLUMNS,
    RewardConfigError,
    RewardSpec,
    get_reward,
    required_columns,
)

__all__ = ["validate_rewards"]

_JUDGE_ARGS = {"judge_verifier": {"answer"}, "rubric": {"rubric", "aggregation"}}


def _as_spec(obj: Any) -> RewardSpec:
    """A RewardSpec from a spec, a bare name, a mapping or a config object with name/weight."""
    if isinstance(obj, RewardSpec):
        return obj
    if isinstance(obj, str):
        return RewardSpec(obj)
    if isinstance(obj, Mapping):
        unknown = sorted(set(obj) - {"name", "weight", "kwargs", "timeout_s"})
        if unknown or "name" not in obj:
            raise RewardConfigError(
                f"reward entry {dict(obj)!r}: needs 'name'; valid keys: name, weight, kwargs, "
                "timeout_s"
            )
        kwargs = dict(obj.get("kwargs") or {})
        return RewardSpec(obj["name"], obj.get("weight", 1.0), kwargs, obj.get("timeout_s"))
    if hasattr(obj, "name"):
        return RewardSpec(
            obj.name,
            getattr(obj, "weight", 1.0),
            dict(getattr(obj, "kwargs", None) or {}),
            getattr(obj, "timeout_s", None),
        )
    raise RewardConfigError(f"reward entry {obj!r} is not a RewardSpec, a name or a mapping")


def _closest(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _unwrap(fn: Callable[..., Any]) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The function under ``functools.partial`` layers and the keywords they bind."""
    bound: dict[str, Any] = {}
    while isinstance(fn, functools.partial):
        bound = {**fn.keywords, **bound}
        fn = fn.func
    return fn, bound


def _judge_kind(fn: Callable[..., Any]) -> str | None:
    """``"rubric"``/``"judge_verifier"`` when ``fn`` is one of the judge rewards."""
    from rewards import rubric, verifier

    if fn is verifier.judge_verifier:
        return "judge_verifier"
    if fn is rubric.rubric:
        return "rubric"
    return None


def _check_kwargs(name: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> list[str]:
    """Spec kwargs the reward cannot use (its ``**_`` only swallows dataset columns)."""
    try:
        params = list(inspect.signature(fn).parameters.values())[2:]
    except (TypeError, ValueError):
        return []
    named = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    var_kw = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var_kw is not None and not var_kw.startswith("_"):
        return []  # the reward takes arbitrary options; it validates them itself
    valid = ", ".join(named) or "none"
    return [
        f"reward {name!r} has no option {k!r}; {_closest(k, named)}valid: {valid}"
        for k in sorted(set(kwargs) - set(named))
    ]


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value can be an argument of annotation `hint` (unknown kinds: yes)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    hint = origin or hint
    if hint in (list, tuple):  # a YAML list is either
        return isinstance(value, list | tuple)
    if hint in (bool, str, dict):
        return isinstance(value, hint)
    return True  # Any, Literal, classes of the reward's own: it checks them itself


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    names |= {type(None): "null", list: "a list", tuple: "a list", dict: "a mapping"}
    hint = typing.get_origin(hint) or hint
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _check_kwarg_types(name: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> list[str]:
    """Spec kwargs whose value does not fit the reward's annotation of that parameter (a value
    that would make the reward fail on every sample, each failure a masked ``None``)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations that do not resolve are not checked
        return []
    return [
        f"reward {name!r}: {key}={value!r} must be {_describe(hints[key])}"
        for key, value in kwargs.items()
        if key in hints and not _fits(value, hints[key])
    ]


def _check_model_columns(spec: RewardSpec, columns: Mapping, supplied: Iterable[str]) -> list[str]:
    """A policy-computed column (``MODEL_COLUMNS``) needs a caller that supplies it."""
    out = []
    for col in required_columns(spec.name):
        if col not in MODEL_COLUMNS:
            continue
        if col not in supplied:
            out.append(
                f"reward {spec.name!r} needs {col!r} ({MODEL_COLUMNS[col]}), which only the "
                "sampling algorithms (train.algorithm grpo, rebel) compute; it cannot be used "
                "here (e.g. as eval.reward or with this algorithm)"
            )
        elif col in columns:
            out.append(
                f"reward {spec.name!r}: dataset column {col!r} would be overwritten by the "
                "value computed from the policy; rename the column"
            )
    return out


def _check_columns(spec: RewardSpec, kwargs: dict[str, Any], columns: Mapping) -> list[str]:
    present = sorted(columns)
    out = [
        f"reward {spec.name!r} needs {col!r} as a dataset column or a kwarg; "
        f"{_closest(col, present)}columns present: {present}"
        for col in required_columns(spec.name, kwargs)
        if col not in columns and col not in kwargs and col not in MODEL_COLUMNS
    ]
    clash = sorted(set(spec.kwargs) & set(columns))
    if clash:
        out.append(
            f"reward {spec.name!r}: kwarg(s) {clash} collide with dataset column(s) of the same "
            "name; drop one of them"
        )
    return out


def _check_rubric_source(name: str, kwargs: dict[str, Any], columns: Mapping) -> list[str]:
    """Parse the rubric kwarg, or every distinct rubric of the ``rubric`` column."""
    from rewards.rubric import parse_rubric

    if "rubric" in kwargs:
        try:
            parse_rubric(kwargs["rubric"])
        except ConfigError as e:
            return [f"reward {name!r}: {e}"]
        return []
    values = columns.get("rubric")
    if not isinstance(values, list | tuple):
        return []  # only the column's name is known here
    seen: set[str] = set()
    for row, value in enumerate(values):
        if value is None:
            continue
        key = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            parse_rubric(value)
        except ConfigError as e:
            return [f"reward {name!r}: rubric of dataset row {row}: {e}"]
    if values and not seen:
        return [f"reward {name!r}: the 'rubric' column is empty (None) in every row"]
    return []


def _check_judge(
    spec: RewardSpec, kind: str, kwargs: dict[str, Any], columns: Mapping, reach: dict
) -> list[str]:
    """Judge options, rubric and (collected in ``reach``) the client to check for reachability."""
    from rewards import judge
    from rewards.rubric import AGGREGATIONS

    name = spec.name
    out = [
        f"reward {name!r}: {key!r} must be one value given as a kwarg, not a dataset column"
        for key in ("base_url", "model")
        if key in columns and key not in kwargs
    ]
    options = {
        k: v
        for k, v in kwargs.items()
        if k not in {"base_url", "model", "check"} | _JUDGE_ARGS[kind]
    }
    valid = sorted(judge.CLIENT_OPTIONS)
    for key in sorted(set(options) - judge.CLIENT_OPTIONS):
        out.append(
            f"reward {name!r}: unknown judge option {key!r}; {_closest(key, valid)}"
            f"valid: base_url, model, {', '.join(sorted(_JUDGE_ARGS[kind]))}, "
            f"{', '.join(valid)}"
        )
        options.pop(key)
    aggregation = kwargs.get("aggregation", "explicit")
    if kind == "rubric" and aggregation not in AGGREGATIONS:
        out.append(
            f"reward {name!r}: aggregation={aggregation!r} is not valid; valid: "
            f"{', '.join(AGGREGATIONS)}"
        )
    if kind == "rubric":
        out += _check_rubric_source(name, kwargs, columns)
    base_url, model = kwargs.get("base_url"), kwargs.get("model")
    if base_url is None or model is None:
        return out  # reported as a missing column already
    try:
        client = judge.get_client(base_url, model, check=False, **options)
    except ConfigError as e:
        return [*out, f"reward {name!r}: {e}"]
    if kwargs.get("check", True):
        reach.setdefault(id(client), (name, client))  # one check per shared client
    return out


def _check_spec(
    spec: RewardSpec, columns: Mapping, reach: dict, supplied: Iterable[str] = ()
) -> list[str]:
    """Every problem of one reward (empty when it is fine)."""
    name = spec.name
    try:
        fn = get_reward(name)
    except (RewardConfigError, ImportError) as e:
        return [str(e)]
    out = []
    weight = spec.weight
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        out.append(f"reward {name!r}: weight={weight!r} must be a finite number")
    limit = spec.timeout_s
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int | float) or not limit > 0
    ):
        out.append(f"reward {name!r}: timeout_s={limit!r} must be a number > 0 or None")
    fn, bound = _unwrap(fn)
    kwargs = {**bound, **spec.kwargs}
    out += _check_columns(spec, kwargs, columns)
    out += _check_model_columns(spec, columns, supplied)
    kind = _judge_kind(fn)
    if kind is not None:
        out += _check_judge(spec, kind, kwargs, columns, reach)
    else:
        out += _check_kwargs(name, fn, spec.kwargs)
        out += _check_kwarg_types(name, fn, spec.kwargs)
    return out


def validate_rewards(
    specs: Iterable[Any],
    columns: Mapping[str, Any] | Iterable[str],
    *,
    check_judges: bool = True,
    model_columns: Iterable[str] = (),
) -> list[RewardSpec]:
    """Check a run's rewards against its dataset once, before training.

    Args:
        specs: the rewards: ``RewardSpec``s, bare names, mappings ``{name, weight, kwargs,
            timeout_s}`` or config objects with ``name``/``weight``/``kwargs`` attributes
            (``posttrain.config.RewardConfig``).
        columns: dataset column name -> values (a list per column, e.g. ``{k: [row[k] for row in
            rows]}``, enables the per-row rubric check; ``None`` values check names only), or just
            the column names. Leave out the prompt column.
        check_judges: contact each judge server (``GET /v1/models``) unless a spec sets
            ``check: false``.
        model_columns: the ``MODEL_COLUMNS`` (e.g. ``token_entropy``) the caller computes from
            the policy and adds to every reward call; a reward needing one that is not supplied
            here is an error (e.g. ``neg_entropy`` as the evaluation reward).

    Returns:
        The specs as ``RewardSpec``s, in order.

    Raises:
        RewardConfigError: (a ``ConfigError``/ValueError) listing every problem found, on one
            line (numbered when there are several).
    """
    if not isinstance(columns, Mapping):
        columns = dict.fromkeys(columns)
    problems: list[str] = []
    out: list[RewardSpec] = []
    for raw in specs:
        try:
            out.append(_as_spec(raw))
        except RewardConfigError as e:
            problems.append(str(e))
    if not out and not problems:
        problems.append("no rewards configured; add at least one (see rewards.available())")
    seen: set[str] = set()
    reach: dict[int, tuple[str, Any]] = {}
    for spec in out:
        if spec.name in seen:
            problems.append(
                f"reward {spec.name!r} appears twice; register a second name with "
                "rewards.register(name, functools.partial(fn, ...)) to use it twice"
            )
            continue
        seen.add(spec.name)
        problems += _check_spec(spec, columns, reach, tuple(model_columns))
    if check_judges:
        for name, client in reach.values():
            try:
                client.check_reachable()
            except ConfigError as e:
                problems.append(f"reward {name!r}: {e}")
    if len(problems) == 1:
        raise RewardConfigError(problems[0])
    if problems:  # one line, as every ConfigError
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, start=1))
        raise RewardConfigError(f"{len(problems)} reward problems: {listed}")
    return out
