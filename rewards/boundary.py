"""The reward boundary: every reward call is fault-isolated here.

``score`` calls each reward once for the whole batch, all rewards concurrently, each under a
timeout. Sync rewards run in their own daemon worker thread (a hung reward cannot block the
process from exiting or starve the others); async rewards (coroutine functions, or callables that
return an awaitable) run in a fresh event loop in such a thread under ``asyncio.wait_for``.

A reward marked with ``@per_sample`` is instead ``fn(prompt, completion, **row) -> float | None``
and is isolated per sample: each sample gets its own timeout (``timeout_s`` applies to one sample,
not the batch), and an exception or hang voids only that sample. Sync per-sample rewards run in
waves of at most ``PER_SAMPLE_CONCURRENCY`` daemon threads; async ones run concurrently in one
event loop (at most ``PER_SAMPLE_CONCURRENCY`` in flight).

Whatever goes wrong in a reward becomes ``None`` for the affected samples, with a reason:

- ``exception``: the reward raised (all samples of that call; one sample for ``@per_sample``);
- ``timeout``: the call did not finish within its timeout (likewise);
- ``wrong_length``: the returned list's length differs from the number of completions (all);
- ``wrong_type``: the return value is not a list, or one entry is not a real number
  (``bool`` is not a number) (the call, or that entry);
- ``nan``: an entry is NaN or +-inf;
- ``none``: the reward itself returned ``None`` for the entry (it abstained) without saying why;
- any reason the reward reports itself: a reward may return a ``RewardOutput`` (a ``list``
  subclass) whose ``reasons[i]`` says why entry ``i`` is ``None`` (e.g. the judge's
  ``unparseable``, ``timeout``, ``http_500``); it replaces ``none`` for that entry. Reasons are
  turned into metric-safe slugs (lower case ``[a-z0-9_]``, at most 48 characters).

Each case is logged (logger ``posttrain.rewards``) with the sample indices and counted in
``RewardResult.errors['reward/<name>/errors/<reason>']`` as the number of affected samples.
A ``RewardOutput`` may also carry batch ``metrics`` (e.g. per-rubric-item rates), reported as
``reward/<name>/<key>``. Nothing here raises for a reward's misbehaviour; ``score`` raises only for
caller errors (unknown reward, missing column, misaligned lists).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import numbers
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rewards.registry import RewardSpec

__all__ = [
    "PER_SAMPLE_CONCURRENCY",
    "REASONS",
    "RewardOutput",
    "RewardResult",
    "is_per_sample",
    "per_sample",
    "reward_metrics",
    "score",
    "slug",
]

logger = logging.getLogger("posttrain.rewards")

REASONS = ("exception", "timeout", "nan", "wrong_length", "wrong_type", "none")
PER_SAMPLE_CONCURRENCY = 32  # per-sample calls in flight at once for one @per_sample reward
_ASYNC_GRACE_S = 0.25  # extra wait for an async reward to report its own cancellation
_MAX_LOGGED_INDICES = 20
_MAX_REASON_CHARS = 48
_RESERVED_METRICS = ("mean", "seconds", "errors")
_PER_SAMPLE_ATTR = "__reward_per_sample__"


class RewardOutput(list):
    """A reward's [N] scores plus why each ``None`` is ``None``, and optional batch metrics.

    A plain list is always a valid return value; a RewardOutput compares equal to the list of
    its scores, so callers that only need the scores are unaffected. Example::

        return RewardOutput([0.5, None], reasons=[None, "unparseable"])

    Attributes:
        reasons: [N] short reason per sample (read only where the score is None; None = "none").
        details: [N] free text per sample for the log (e.g. an excerpt of a judge's answer).
        metrics: batch metrics, logged by ``score`` as ``reward/<name>/<key>`` (finite numbers;
            keys ``mean``, ``seconds`` and ``errors/...`` are reserved and dropped).
    """

    def __init__(
        self,
        scores: Sequence[Any] = (),
        reasons: Sequence[str | None] | None = None,
        *,
        details: Sequence[str] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        super().__init__(scores)
        n = len(self)
        self.reasons: list[str | None] = list(reasons) if reasons is not None else [None] * n
        self.details: list[str] = list(details) if details is not None else [""] * n
        if len(self.reasons) != n or len(self.details) != n:
            raise ValueError(
                f"RewardOutput: {n} scores but {len(self.reasons)} reasons and "
                f"{len(self.details)} details; give one per score"
            )
        self.metrics: dict[str, float] = dict(metrics or {})


def per_sample(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn(prompt, completion, **row) -> float | None`` as a per-sample reward.

    ``score`` then calls it once per sample (columns as that row's values, spec kwargs as is),
    each call under its own timeout, so an exception or a hang voids only that sample. Works on
    sync and async functions (and methods); returns a marked wrapper with ``fn``'s signature,
    still callable on one sample; ``fn`` itself is left unchanged.
    """
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await fn(*args, **kwargs)

    else:

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

    setattr(wrapper, _PER_SAMPLE_ATTR, True)
    return wrapper


def is_per_sample(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` was marked with ``per_sample``."""
    return getattr(fn, _PER_SAMPLE_ATTR, False) is True


@dataclass
class RewardResult:
    """Scores of one batch.

    Attributes:
        total: [N] weighted sum over rewards; ``None`` where any component is ``None``.
        per_reward: name -> [N] scores of that reward (``None`` = could not judge).
        errors: ``reward/<name>/errors/<reason>`` -> number of affected samples (only non-zero).
        reasons: [N] ``None`` when every reward scored the sample, else ``"name:reason; ..."``.
        seconds: name -> wall-clock seconds of that reward's call.
        metrics: ``reward/<name>/<key>`` -> value, the batch metrics rewards reported through
            ``RewardOutput.metrics``.
    """

    total: list[float | None]
    per_reward: dict[str, list[float | None]]
    errors: dict[str, int] = field(default_factory=dict)
    reasons: list[str | None] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


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
    name: str,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    timeout_s: float | None,
    deadline_s: float | None = None,
) -> _Call:
    """Start ``fn(*args, **kwargs)`` in a daemon thread; the deadline includes the async grace.

    ``deadline_s`` (seconds from now) overrides the deadline derived from ``timeout_s``.
    """
    is_async = inspect.iscoroutinefunction(fn)
    grace = _ASYNC_GRACE_S if is_async else 0.0
    call = _Call(name=name, deadline=None)
    call.started = time.monotonic()
    if deadline_s is not None:
        call.deadline = call.started + deadline_s
    elif timeout_s is not None:
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


# ----------------------------------------------------------------------- per-sample rewards
_Outcome = tuple[Any, str | None, str]  # (returned value, failure reason, detail)


def _error_outcome(error: BaseException, timeout_s: float | None) -> _Outcome:
    reason = "timeout" if isinstance(error, TimeoutError) else "exception"
    if reason == "timeout" and not str(error):
        return None, reason, f"did not finish within {timeout_s}s"
    return None, reason, f"{type(error).__name__}: {error}"


def _per_sample_threads(
    name: str, fn: Callable[..., Any], args: list[tuple], rows: list[dict], timeout_s: float | None
) -> list[_Outcome]:
    """Each sample in its own daemon thread, at most PER_SAMPLE_CONCURRENCY at a time."""
    out: list[_Outcome] = []
    for lo in range(0, len(args), PER_SAMPLE_CONCURRENCY):
        wave = range(lo, min(len(args), lo + PER_SAMPLE_CONCURRENCY))
        calls = [_start(f"{name}[{i}]", fn, args[i], rows[i], timeout_s) for i in wave]
        for call in calls:
            if not _wait(call):
                out.append((None, "timeout", f"did not finish within {timeout_s}s"))
            elif call.error is not None:
                out.append(_error_outcome(call.error, timeout_s))
            else:
                out.append((call.value, None, ""))
    return out


async def _per_sample_async(
    fn: Callable[..., Any], args: list[tuple], rows: list[dict], timeout_s: float | None
) -> list[_Outcome]:
    """Every sample as its own task in this loop, each under ``wait_for``."""
    sem = asyncio.Semaphore(PER_SAMPLE_CONCURRENCY)

    async def one(i: int) -> _Outcome:
        async with sem:
            try:
                return await asyncio.wait_for(fn(*args[i], **rows[i]), timeout_s), None, ""
            except Exception as e:  # the reward boundary, per sample
                return _error_outcome(e, timeout_s)

    return list(await asyncio.gather(*(one(i) for i in range(len(args)))))


def _run_per_sample(
    name: str, fn: Callable[..., Any], args: list[tuple], rows: list[dict], timeout_s: float | None
) -> RewardOutput:
    """Score a batch with a per-sample reward; failures become None with a per-sample reason."""
    if inspect.iscoroutinefunction(fn):
        outcomes = asyncio.run(_per_sample_async(fn, args, rows, timeout_s))
    else:
        outcomes = _per_sample_threads(name, fn, args, rows, timeout_s)
    return RewardOutput(
        [o[0] for o in outcomes], [o[1] for o in outcomes], details=[o[2] for o in outcomes]
    )


def _per_sample_deadline(n: int, timeout_s: float | None) -> float | None:
    """Outer deadline of a per-sample batch: every wave at its full timeout, plus grace."""
    if timeout_s is None:
        return None
    waves = max(1, math.ceil(n / PER_SAMPLE_CONCURRENCY))
    return waves * (timeout_s + _ASYNC_GRACE_S) + _ASYNC_GRACE_S


def _start_reward(
    spec: RewardSpec,
    fn: Callable[..., Any],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list],
    timeout_s: float | None,
) -> _Call:
    kwargs = _accepted_kwargs(fn, {**columns, **spec.kwargs})
    if not is_per_sample(fn):
        return _start(spec.name, fn, (list(prompts), list(completions)), kwargs, timeout_s)
    per_row = [k for k in kwargs if k in columns and k not in spec.kwargs]
    const = {k: v for k, v in kwargs.items() if k not in per_row}
    rows = [{**{k: columns[k][i] for k in per_row}, **const} for i in range(len(completions))]
    args = list(zip(prompts, completions, strict=True))
    return _start(
        spec.name,
        _run_per_sample,
        (spec.name, fn, args, rows, timeout_s),
        {},
        timeout_s,
        deadline_s=_per_sample_deadline(len(completions), timeout_s),
    )


# ----------------------------------------------------------------------- validation
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


def slug(reason: Any) -> str:
    """A reward-reported reason as a metric-safe slug (``[a-z0-9_]``, <= 48 chars; "none")."""
    text = re.sub(r"[^a-z0-9_]+", "_", str(reason).lower()).strip("_")
    return text[:_MAX_REASON_CHARS] or "none"


def _own(value: Any, attr: str, n: int) -> list[Any]:
    """``value.<attr>`` when it is a per-sample list of length n (RewardOutput), else Nones."""
    got = getattr(value, attr, None)
    if isinstance(got, list | tuple) and len(got) == n:
        return list(got)
    return [None] * n


def _validate(
    call: _Call, in_time: bool, n: int
) -> tuple[list[float | None], list[str | None], dict[str, str]]:
    """A finished (or not) call as ([N] scores, [N] reasons, reason -> detail for the log)."""
    if not in_time:
        return [None] * n, ["timeout"] * n, {"timeout": "did not finish in time"}
    if call.error is not None:
        reason = "timeout" if isinstance(call.error, TimeoutError) else "exception"
        return [None] * n, [reason] * n, {reason: f"{type(call.error).__name__}: {call.error}"}
    value = call.value
    if hasattr(value, "tolist") and not isinstance(value, list | tuple):
        value = value.tolist()  # numpy arrays, torch tensors
    if not isinstance(value, list | tuple):
        detail = f"returned {type(value).__name__}, not a list"
        return [None] * n, ["wrong_type"] * n, {"wrong_type": detail}
    if len(value) != n:
        detail = f"returned {len(value)} scores for {n} samples"
        return [None] * n, ["wrong_length"] * n, {"wrong_length": detail}
    own_reasons, own_details = _own(value, "reasons", n), _own(value, "details", n)
    scores: list[float | None] = []
    reasons: list[str | None] = []
    details: dict[str, str] = {}
    for i, x in enumerate(value):
        score_i, reason = _check_entry(x)
        if reason == "none" and own_reasons[i] is not None:
            reason = slug(own_reasons[i])
        scores.append(score_i)
        reasons.append(reason)
        if reason is not None and reason not in details:
            details[reason] = str(own_details[i] or "per-sample values")
    return scores, reasons, details


def _check_entry(x: Any) -> tuple[float | None, str | None]:
    if x is None:
        return None, "none"
    if not _is_number(x):
        return None, "wrong_type"
    if not math.isfinite(float(x)):
        return None, "nan"
    return float(x), None


def _own_metrics(name: str, call: _Call, in_time: bool) -> dict[str, float]:
    """``reward/<name>/<key>`` for the finite numbers in the returned value's ``metrics``."""
    got = getattr(call.value, "metrics", None) if in_time and call.error is None else None
    if not isinstance(got, dict):
        return {}
    out = {}
    for key, v in got.items():
        key = str(key).strip("/")
        if not key or key.split("/")[0] in _RESERVED_METRICS:
            continue
        if _is_number(v) and math.isfinite(float(v)):
            out[f"reward/{name}/{key}"] = float(v)
    return out


def _log(
    name: str, reasons: list[str | None], details: dict[str, str], error: BaseException | None
) -> None:
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
            details.get(reason, ""),
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
            per sample for ``@per_sample`` rewards; ``None`` waits forever.

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
        limit = spec.timeout_s if spec.timeout_s is not None else timeout_s
        calls[spec.name] = _start_reward(spec, fns[spec.name], prompts, completions, columns, limit)

    per_reward: dict[str, list[float | None]] = {}
    per_reasons: dict[str, list[str | None]] = {}
    errors: dict[str, int] = {}
    seconds: dict[str, float] = {}
    metrics: dict[str, float] = {}
    for name, call in calls.items():
        in_time = _wait(call)
        end = call.finished if in_time and call.finished is not None else time.monotonic()
        seconds[name] = end - call.started
        scores, reasons, details = _validate(call, in_time, n)
        per_reward[name], per_reasons[name] = scores, reasons
        for r in reasons:
            if r is not None:
                key = f"reward/{name}/errors/{r}"
                errors[key] = errors.get(key, 0) + 1
        metrics.update(_own_metrics(name, call, in_time))
        _log(name, reasons, details, call.error if in_time else None)

    total = _weighted_total(spec_list, per_reward, n)
    sample_reasons = [
        "; ".join(f"{s.name}:{per_reasons[s.name][i]}" for s in spec_list if per_reasons[s.name][i])
        or None
        for i in range(n)
    ]
    return RewardResult(total, per_reward, errors, sample_reasons, seconds, metrics)


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
        ``reward/<name>/seconds``, every error count as a float and the rewards' own batch
        metrics (``RewardResult.metrics``).
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
    out.update(result.metrics)
    return out
