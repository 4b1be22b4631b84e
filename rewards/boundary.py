"""The reward boundary: every reward call is fault-isolated here.

``score`` calls each reward once for the whole batch, all rewards concurrently, each under a
timeout. Sync rewards run in their own daemon worker thread (a hung reward cannot block the
process from exiting or starve the others); async rewards (coroutine functions, or callables that
return an awaitable) run in a fresh event loop in such a thread under ``asyncio.wait_for``.

Whatever goes wrong in a reward becomes ``None`` for the affected samples, with a reason:

- ``exception``: the reward raised (all samples of that call);
- ``timeout``: the call did not finish within its timeout (all samples);
- ``wrong_length``: the returned list's length differs from the number of completions (all);
- ``wrong_type``: the return value is not a list, or one entry is not a real number
  (``bool`` is not a number) (the call, or that entry);
- ``nan``: an entry is NaN or +-inf;
- ``none``: the reward itself returned ``None`` for the entry (it abstained).

Each case is logged (logger ``posttrain.rewards``) with the sample indices and counted in
``RewardResult.errors['reward/<name>/errors/<reason>']`` as the number of affected samples.
Nothing here raises for a reward's misbehaviour; ``score`` raises only for caller errors (unknown
reward, missing column, misaligned lists).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rewards.registry import RewardSpec

__all__ = ["REASONS", "RewardResult", "reward_metrics", "score"]

logger = logging.getLogger("posttrain.rewards")

REASONS = ("exception", "timeout", "nan", "wrong_length", "wrong_type", "none")
_ASYNC_GRACE_S = 0.25  # extra wait for an async reward to report its own cancellation
_MAX_LOGGED_INDICES = 20


@dataclass
class RewardResult:
    """Scores of one batch.

    Attributes:
        total: [N] weighted sum over rewards; ``None`` where any component is ``None``.
        per_reward: name -> [N] scores of that reward (``None`` = could not judge).
        errors: ``reward/<name>/errors/<reason>`` -> number of affected samples (only non-zero).
        reasons: [N] ``None`` when every reward scored the sample, else ``"name:reason; ..."``.
        seconds: name -> wall-clock seconds of that reward's call.
    """

    total: list[float | None]
    per_reward: dict[str, list[float | None]]
    errors: dict[str, int] = field(default_factory=dict)
    reasons: list[str | None] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Call:
    """One reward call running in a worker thread."""

    name: str
    deadline: float | None
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None
    started: float = 0.0
    finished: float | None = None


def _run_awaitable(awaitable: Any, timeout_s: float | None) -> Any:
    async def guarded() -> Any:
        return await asyncio.wait_for(awaitable, timeout_s)

    return asyncio.run(guarded())


def _worker(
    call: _Call, fn: Callable[..., Any], args: tuple, kwargs: dict, timeout_s: float | None
) -> None:
    try:
        if inspect.iscoroutinefunction(fn):
            call.value = _run_awaitable(fn(*args, **kwargs), timeout_s)
        else:
            value = fn(*args, **kwargs)
            if inspect.isawaitable(value):
                remaining = None if timeout_s is None else max(0.0, timeout_s - _elapsed(call))
                value = _run_awaitable(value, remaining)
            call.value = value
    except BaseException as e:  # the reward boundary: anything a reward does is contained
        call.error = e
    finally:
        call.finished = time.monotonic()
        call.done.set()


def _elapsed(call: _Call) -> float:
    return time.monotonic() - call.started


def _start(
    name: str, fn: Callable[..., Any], args: tuple, kwargs: dict, timeout_s: float | None
) -> _Call:
    """Start ``fn(*args, **kwargs)`` in a daemon thread; the deadline includes the async grace."""
    is_async = inspect.iscoroutinefunction(fn)
    grace = _ASYNC_GRACE_S if is_async else 0.0
    call = _Call(name=name, deadline=None)
    call.started = time.monotonic()
    if timeout_s is not None:
        call.deadline = call.started + timeout_s + grace
    thread = threading.Thread(
        target=_worker,
        args=(call, fn, args, kwargs, timeout_s),
        name=f"reward-{name}",
        daemon=True,
    )
    thread.start()
    return call


def _wait(call: _Call) -> bool:
    """Wait until the call's deadline; True if it finished in time."""
    remaining = None if call.deadline is None else max(0.0, call.deadline - time.monotonic())
    return call.done.wait(remaining)


def _accepted_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop columns a reward without ``**kwargs`` cannot accept."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _validate(
    call: _Call, in_time: bool, n: int
) -> tuple[list[float | None], list[str | None], str]:
    """Turn a finished (or not) call into ([N] scores, [N] reasons, detail for the log)."""
    if not in_time:
        return [None] * n, ["timeout"] * n, "did not finish in time"
    if call.error is not None:
        reason = "timeout" if isinstance(call.error, TimeoutError) else "exception"
        return [None] * n, [reason] * n, f"{type(call.error).__name__}: {call.error}"
    value = call.value
    if hasattr(value, "tolist") and not isinstance(value, list | tuple):
        value = value.tolist()  # numpy arrays, torch tensors
    if not isinstance(value, list | tuple):
        return [None] * n, ["wrong_type"] * n, f"returned {type(value).__name__}, not a list"
    if len(value) != n:
        return [None] * n, ["wrong_length"] * n, f"returned {len(value)} scores for {n} samples"
    checked = [_check_entry(x) for x in value]
    return [c[0] for c in checked], [c[1] for c in checked], "per-sample values"


def _check_entry(x: Any) -> tuple[float | None, str | None]:
    if x is None:
        return None, "none"
    if not _is_number(x):
        return None, "wrong_type"
    if not math.isfinite(float(x)):
        return None, "nan"
    return float(x), None


def _log(name: str, reasons: list[str | None], detail: str, error: BaseException | None) -> None:
    by_reason: dict[str, list[int]] = {}
    for i, r in enumerate(reasons):
        if r is not None:
            by_reason.setdefault(r, []).append(i)
    for reason, idx in by_reason.items():
        shown = idx[:_MAX_LOGGED_INDICES]
        more = f" (+{len(idx) - len(shown)} more)" if len(idx) > len(shown) else ""
        level = logging.INFO if reason == "none" else logging.WARNING
        exc_info = error if reason == "exception" else None
        logger.log(
            level,
            "reward %r: %s on sample(s) %s%s [%s]",
            name,
            reason,
            shown,
            more,
            detail,
            exc_info=exc_info,
        )


def _normalise(specs: Sequence[RewardSpec | str]) -> list[RewardSpec]:
    from rewards.registry import RewardConfigError, RewardSpec

    out = [RewardSpec(s) if isinstance(s, str) else s for s in specs]
    seen: set[str] = set()
    for spec in out:
        if spec.name in seen:
            raise RewardConfigError(
                f"reward {spec.name!r} appears twice in the specs; register a second name with "
                "rewards.register(name, functools.partial(fn, ...)) to use it twice"
            )
        seen.add(spec.name)
    return out


def _check_lengths(prompts: list[str], completions: list[str], columns: dict[str, list]) -> None:
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"score: {len(prompts)} prompts but {n} completions; they must align")
    for col, values in columns.items():
        if len(values) != n:
            raise ValueError(
                f"score: column {col!r} has {len(values)} values but there are {n} completions; "
                "repeat each row once per completion"
            )


def score(
    specs: Sequence[RewardSpec | str],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list] | None = None,
    timeout_s: float | None = 30.0,
) -> RewardResult:
    """Score a batch with several rewards, fault-isolated, concurrently.

    Args:
        specs: Rewards to apply (``RewardSpec`` or bare registry names, weight 1).
        prompts: [N] prompt strings.
        completions: [N] completion strings.
        columns: dataset column -> [N] values, aligned with ``completions``.
        timeout_s: Default per-call timeout in seconds (``RewardSpec.timeout_s`` overrides);
            ``None`` waits forever.

    Returns:
        RewardResult with [N] totals, per-reward scores, error counts, per-sample reasons, seconds.

    Raises:
        ValueError: caller errors only: unknown reward, missing column, duplicate spec
            (``RewardConfigError``), misaligned lists.
        ImportError: a requested reward's module cannot be imported.
    """
    from rewards.registry import check_columns, get_reward

    columns = dict(columns or {})
    spec_list = _normalise(specs)
    _check_lengths(prompts, completions, columns)
    check_columns(spec_list, columns)
    fns = {spec.name: get_reward(spec.name) for spec in spec_list}
    n = len(completions)

    calls: dict[str, _Call] = {}
    for spec in spec_list:
        fn = fns[spec.name]
        kwargs = _accepted_kwargs(fn, {**columns, **spec.kwargs})
        limit = spec.timeout_s if spec.timeout_s is not None else timeout_s
        calls[spec.name] = _start(spec.name, fn, (list(prompts), list(completions)), kwargs, limit)

    per_reward: dict[str, list[float | None]] = {}
    per_reasons: dict[str, list[str | None]] = {}
    errors: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for name, call in calls.items():
        in_time = _wait(call)
        end = call.finished if in_time and call.finished is not None else time.monotonic()
        seconds[name] = end - call.started
        scores, reasons, detail = _validate(call, in_time, n)
        per_reward[name], per_reasons[name] = scores, reasons
        for r in reasons:
            if r is not None:
                key = f"reward/{name}/errors/{r}"
                errors[key] = errors.get(key, 0) + 1
        _log(name, reasons, detail, call.error if in_time else None)

    total = _weighted_total(spec_list, per_reward, n)
    sample_reasons = [
        "; ".join(f"{s.name}:{per_reasons[s.name][i]}" for s in spec_list if per_reasons[s.name][i])
        or None
        for i in range(n)
    ]
    return RewardResult(total, per_reward, errors, sample_reasons, seconds)


def _weighted_total(
    specs: list[RewardSpec], per_reward: dict[str, list[float | None]], n: int
) -> list[float | None]:
    total: list[float | None] = []
    for i in range(n):
        acc: float | None = 0.0
        for spec in specs:
            v = per_reward[spec.name][i]
            if v is None:
                acc = None
                break
            acc += spec.weight * v
        total.append(acc)
    return total


def reward_metrics(result: RewardResult) -> dict[str, float]:
    """Scalar metrics of one batch for logging.

    Returns:
        ``reward/<name>/mean`` (over non-None entries; omitted when all are None),
        ``reward/total/mean`` (likewise), ``reward/masked_count`` (samples whose total is None),
        ``reward/<name>/seconds`` and every error count as a float.
    """
    out: dict[str, float] = {}
    for name, values in result.per_reward.items():
        ok = [v for v in values if v is not None]
        if ok:
            out[f"reward/{name}/mean"] = sum(ok) / len(ok)
    ok_total = [v for v in result.total if v is not None]
    if ok_total:
        out["reward/total/mean"] = sum(ok_total) / len(ok_total)
    out["reward/masked_count"] = float(len(result.total) - len(ok_total))
    for name, s in result.seconds.items():
        out[f"reward/{name}/seconds"] = float(s)
    for key, count in result.errors.items():
        out[key] = float(count)
    return out
