"""LLM judge over any OpenAI-compatible ``/v1/chat/completions`` endpoint.

``JudgeClient`` sends chat requests with httpx (async, at most ``max_concurrency`` in flight per
batch), retries timeouts, connection errors, HTTP 5xx and 429 with exponential backoff
(``backoff_s * 2**attempt`` seconds before retry ``attempt + 1``; other 4xx are not retried), parses
the judge's answer strictly (one JSON object in the message content, fields validated by the caller)
and caches valid answers in memory and optionally in a jsonl file, keyed by a hash of (task, prompt,
completion, rubric/reference, judge model). A failed or invalid judgement is None with a reason,
never 0.

Reasons (short slugs, usable in metric names): ``timeout``, ``connection_error``, ``http_<status>``,
``http_error`` (other httpx errors), ``bad_response`` (HTTP 200 without a chat message),
``unparseable`` (no JSON object in the message), ``invalid_answer`` (JSON with missing or
out-of-range fields), ``no_reference``.

The judge rewards built on it: ``rewards/verifier.py`` (``judge_verifier``) and
``rewards/rubric.py`` (``rubric``).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from posttrain.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

TEMPLATE_VERSION = "judge-v1"
DEFAULT_API_KEY_ENV = "JUDGE_API_KEY"
_EXCERPT = 120
_THINK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)\n?\s*```", re.DOTALL)


class JudgeUnreachableError(ConfigError):
    """The judge server could not be reached (or refused our key) at start-up."""


class JudgeParseError(ValueError):
    """The judge's message is not exactly one JSON object."""


class InvalidJudgeAnswerError(ValueError):
    """The judge's JSON object lacks a field or has one out of range."""


@dataclass(frozen=True)
class JudgeRequest:
    """One judgement to make.

    Attributes:
        messages: chat messages ``[{"role": ..., "content": ...}]`` sent to the judge.
        key_parts: what identifies the judgement for the cache (task, prompt, completion, rubric or
            reference); the judge model and template version are added by the client.
        validate: maps the parsed JSON object to the value to keep; raises InvalidJudgeAnswerError.
    """

    messages: list[dict[str, str]]
    key_parts: dict[str, Any]
    validate: Callable[[dict], dict]


@dataclass(frozen=True)
class JudgeResult:
    """Outcome of one judgement: ``value`` (validated answer) or ``reason`` (+ ``detail``)."""

    value: dict | None
    reason: str | None = None
    detail: str = ""
    cached: bool = False

    @property
    def score(self) -> float | None:
        """``value["score"]`` when present, else None."""
        if self.value is None or "score" not in self.value:
            return None
        return float(self.value["score"])


def _excerpt(text: str) -> str:
    text = text if len(text) <= _EXCERPT else text[:_EXCERPT] + "..."
    return repr(text)


def _reject_constant(name: str) -> float:
    raise JudgeParseError(f"JSON constant {name} is not allowed")


def parse_json_object(content: str) -> dict:
    """Parse the judge's message as exactly one JSON object.

    Accepted: the object alone, or alone inside one ```json fenced block, optionally after a leading
    ``<think>...</think>`` block. Anything else (prose around it, arrays, NaN) is rejected.

    Args:
        content: the assistant message content.

    Returns:
        The parsed object.

    Raises:
        JudgeParseError: with an excerpt of the content.
    """
    text = _THINK.sub("", content, count=1).strip()
    fenced = _FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1).strip()
    if not text.startswith("{"):
        raise JudgeParseError(f"expected one JSON object, got {_excerpt(content)}")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise JudgeParseError(f"invalid JSON ({e.msg}) in {_excerpt(content)}") from e
    if not isinstance(obj, dict):
        raise JudgeParseError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def check_unit_score(obj: dict, field_name: str = "score") -> float:
    """Return ``obj[field_name]`` as a float in [0, 1]; raise InvalidJudgeAnswerError otherwise."""
    if field_name not in obj:
        raise InvalidJudgeAnswerError(f"missing field {field_name!r} (keys: {sorted(obj)})")
    value = obj[field_name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidJudgeAnswerError(f"{field_name}={value!r} is not a finite number")
    if not 0.0 <= value <= 1.0:
        raise InvalidJudgeAnswerError(f"{field_name}={value!r} is outside [0, 1]")
    return float(value)


def cache_key(parts: dict[str, Any], model: str) -> str:
    """sha256 of the canonical JSON of ``parts`` plus the judge model and template version."""
    payload = {"parts": parts, "model": model, "template": TEMPLATE_VERSION}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class _Cache:
    """In-memory dict of valid judge answers (parsed JSON objects), mirrored to a jsonl file."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.data: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        skipped = 0
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    self.data[row["key"]] = row["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    skipped += 1  # e.g. a line cut short by a crash
        if skipped:
            log.warning("judge cache %s: skipped %d unreadable lines", path, skipped)

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self.data[key] = value
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion, also from inside a running event loop (then in a thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _api_root(base_url: str) -> str:
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"judge base_url={base_url!r} must be an http:// or https:// URL")
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


@dataclass
class _Attempt:
    content: str | None
    reason: str | None = None
    detail: str = ""
    retryable: bool = False


@dataclass
class JudgeStats:
    """Counters since the client was made: HTTP attempts, cache hits, failures by reason."""

    requests: int = 0
    cache_hits: int = 0
    failures: dict[str, int] = field(default_factory=dict)


class JudgeClient:
    """Client for an OpenAI-compatible chat-completions judge.

    Args:
        base_url: server root, with or without a trailing ``/v1`` (``http://host:8000`` or
            ``http://host:8000/v1``); requests go to ``<root>/v1/chat/completions``.
        model: model name sent in each request (part of the cache key).
        api_key: bearer token; when None it is read from the env var named ``api_key_env`` (no
            Authorization header when that is unset too).
        api_key_env: env var holding the key.
        max_concurrency: most requests in flight at once within one batch (``judge_many`` call).
        timeout_s: total seconds allowed per HTTP attempt.
        max_retries: retries after the first attempt (timeouts, connection errors, 5xx, 429).
        backoff_s: sleep ``backoff_s * 2**attempt`` before retry ``attempt + 1``.
        cache_path: optional jsonl file mirroring the answer cache (loaded at start, appended to).
        temperature: sampling temperature sent to the judge.
        max_tokens: completion token limit sent to the judge.
        json_mode: also send ``response_format={"type": "json_object"}`` (vLLM, OpenAI).
        extra_body: extra JSON fields merged into every request body (like the OpenAI SDK's
            ``extra_body``), e.g. ``{"response_format": {"type": "json_schema", ...}}``, vLLM's
            ``{"structured_outputs": {...}}`` or ``{"chat_template_kwargs": {...}}``; it cannot
            replace ``model`` or ``messages``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        max_concurrency: int = 8,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        cache_path: str | os.PathLike | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        json_mode: bool = False,
        extra_body: dict[str, Any] | None = None,
    ):
        root = _api_root(base_url)
        if not isinstance(model, str) or not model:
            raise ConfigError(f"judge model={model!r} must be a non-empty model name")
        _require(
            isinstance(max_concurrency, int) and max_concurrency >= 1, "max_concurrency", ">= 1"
        )
        _require(_is_num(timeout_s) and timeout_s > 0, "timeout_s", "> 0")
        _require(isinstance(max_retries, int) and max_retries >= 0, "max_retries", ">= 0")
        _require(_is_num(backoff_s) and backoff_s >= 0, "backoff_s", ">= 0")
        _require(
            extra_body is None
            or (isinstance(extra_body, dict) and not {"model", "messages"} & set(extra_body)),
            "extra_body",
            "a mapping of extra request fields (not 'model' or 'messages')",
        )
        self.base_url = base_url
        self.chat_url = f"{root}/v1/chat/completions"
        self.models_url = f"{root}/v1/models"
        self.model = model
        self.api_key_env = api_key_env
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.max_concurrency = max_concurrency
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.backoff_s = float(backoff_s)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.json_mode = json_mode
        self.extra_body = dict(extra_body or {})
        self.cache = _Cache(cache_path)
        self.stats = JudgeStats()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def check_reachable(self) -> None:
        """GET ``<root>/v1/models``; raise JudgeUnreachableError naming the URL if unusable.

        Raises when the connection fails or times out, on 401/403 (naming ``api_key_env``), and
        when the server lists its models and ``model`` is not among them. Other HTTP answers count
        as reachable.
        """
        try:
            with httpx.Client(timeout=min(self.timeout_s, 10.0)) as http:
                resp = http.get(self.models_url, headers=self._headers())
        except httpx.HTTPError as e:
            raise JudgeUnreachableError(
                f"judge server {self.base_url!r} is unreachable (GET {self.models_url}: "
                f"{type(e).__name__}: {e}); start it or fix base_url"
            ) from e
        if resp.status_code in (401, 403):
            raise JudgeUnreachableError(
                f"judge server {self.base_url!r} refused the API key (HTTP {resp.status_code}); "
                f"set api_key or the env var {self.api_key_env}"
            )
        served = _served_models(resp)
        if served is not None and self.model not in served:
            raise JudgeUnreachableError(
                f"judge server {self.base_url!r} does not serve model {self.model!r}; "
                f"it serves {served}"
            )

    def judge_many(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        """Synchronous ``ajudge_many``."""
        return run_sync(self.ajudge_many(requests))

    async def ajudge_many(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        """Judge every request: cache first, identical keys sent once, the rest concurrently.

        Returns:
            One JudgeResult per request, in order.
        """
        results: list[JudgeResult | None] = [None] * len(requests)
        pending: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = cache_key(req.key_parts, self.model)
            hit = self._cached(key, req)
            if hit is not None:
                self.stats.cache_hits += 1
                results[i] = hit
            else:
                pending.setdefault(key, []).append(i)
        if pending:
            sem = asyncio.Semaphore(self.max_concurrency)
            limits = httpx.Limits(max_connections=self.max_concurrency)
            async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as http:
                outs = await asyncio.gather(
                    *(
                        self._judge_one(http, sem, key, requests[idx[0]])
                        for key, idx in pending.items()
                    )
                )
            for idx, out in zip(pending.values(), outs, strict=True):
                for i in idx:
                    results[i] = out
        return [r for r in results if r is not None]

    def _cached(self, key: str, req: JudgeRequest) -> JudgeResult | None:
        answer = self.cache.get(key)  # the judge's parsed JSON object, validated again on use
        if answer is None:
            return None
        try:
            return JudgeResult(req.validate(answer), cached=True)
        except InvalidJudgeAnswerError:
            return None  # a stale entry: judge again

    async def _judge_one(
        self, http: httpx.AsyncClient, sem: asyncio.Semaphore, key: str, req: JudgeRequest
    ) -> JudgeResult:
        attempt = await self._post_with_retries(http, sem, req.messages)
        if attempt.content is None:
            return self._failed(attempt.reason or "bad_response", attempt.detail)
        try:
            answer = parse_json_object(attempt.content)
            value = req.validate(answer)
        except JudgeParseError as e:
            return self._failed("unparseable", str(e))
        except InvalidJudgeAnswerError as e:
            return self._failed("invalid_answer", f"{e} in {_excerpt(attempt.content)}")
        self.cache.put(key, answer)
        return JudgeResult(value)

    def _failed(self, reason: str, detail: str) -> JudgeResult:
        self.stats.failures[reason] = self.stats.failures.get(reason, 0) + 1
        log.warning("judge %s: %s (%s)", self.chat_url, reason, detail)
        return JudgeResult(None, reason, detail)

    async def _post_with_retries(
        self, http: httpx.AsyncClient, sem: asyncio.Semaphore, messages: list[dict[str, str]]
    ) -> _Attempt:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        body.update(self.extra_body)
        attempt = _Attempt(None, "bad_response")
        for n in range(self.max_retries + 1):
            if n:
                await asyncio.sleep(self.backoff_s * 2 ** (n - 1))
            async with sem:
                attempt = await self._post_once(http, body)
            if not attempt.retryable:
                return attempt
        return attempt

    async def _post_once(self, http: httpx.AsyncClient, body: dict) -> _Attempt:
        self.stats.requests += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await http.post(self.chat_url, json=body, headers=self._headers())
        except (TimeoutError, httpx.TimeoutException):
            return _Attempt(None, "timeout", f"no answer within {self.timeout_s:g}s", True)
        except httpx.TransportError as e:
            return _Attempt(None, "connection_error", f"{type(e).__name__}: {e}", True)
        except httpx.HTTPError as e:  # e.g. too many redirects: retrying won't help
            return _Attempt(None, "http_error", f"{type(e).__name__}: {e}")
        if resp.status_code != 200:
            retry = resp.status_code >= 500 or resp.status_code == 429
            return _Attempt(None, f"http_{resp.status_code}", _excerpt(resp.text), retry)
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            return _Attempt(None, "bad_response", f"no chat message in {_excerpt(resp.text)}")
        if not isinstance(content, str):
            return _Attempt(None, "bad_response", f"message content is {type(content).__name__}")
        return _Attempt(content)


_CLIENT_KW = frozenset(inspect.signature(JudgeClient).parameters) - {"base_url", "model"}
CLIENT_OPTIONS = _CLIENT_KW | {"check"}  # JudgeClient's keyword options + get_client's `check`


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _require(ok: bool, name: str, valid: str) -> None:
    if not ok:
        raise ConfigError(f"judge option {name} must be {valid}")


def _served_models(resp: httpx.Response) -> list[str] | None:
    """Model ids from a ``/v1/models`` answer, or None when the answer isn't such a listing."""
    if resp.status_code != 200:
        return None
    try:
        data = resp.json()["data"]
        return [str(m["id"]) for m in data]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


_CLIENTS: dict[tuple, JudgeClient] = {}
_CLIENTS_LOCK = threading.Lock()


def get_client(base_url: str, model: str, *, check: bool = True, **options: Any) -> JudgeClient:
    """A JudgeClient shared by every call with the same settings (so its in-memory cache lives on).

    The first call for a setting runs ``check_reachable`` (when ``check``), so a wrong URL fails at
    start-up with a clear error instead of turning every reward into None.
    """
    unknown = set(options) - CLIENT_OPTIONS
    if unknown:
        raise ConfigError(
            f"unknown judge options {sorted(unknown)}; valid: {sorted(CLIENT_OPTIONS)}"
        )
    key = (base_url, model, json.dumps(options, sort_keys=True, default=str))
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = JudgeClient(base_url, model, **options)
            if check:
                client.check_reachable()
            _CLIENTS[key] = client
    return client


def reset_clients() -> None:
    """Forget the shared clients (and their in-memory caches); mostly for tests."""
    with _CLIENTS_LOCK:
        _CLIENTS.clear()


def split_options(kw: dict[str, Any], n: int, fn_name: str) -> dict[str, Any]:
    """Keep the judge options of ``kw``; drop extra dataset columns (lists of length ``n``).

    Reward functions receive every dataset column as a keyword, so columns are ignored, but any
    other unknown keyword is a typo and raises ConfigError.
    """
    options = {}
    for name, value in kw.items():
        if name in CLIENT_OPTIONS:
            options[name] = value
        elif not (isinstance(value, list | tuple) and len(value) == n):
            raise ConfigError(
                f"{fn_name}: unknown option {name!r}; valid: base_url, model, "
                f"{sorted(CLIENT_OPTIONS)}"
            )
    return options


def render_prompt(prompt: Any) -> str:
    """A prompt as text: strings as is, chat messages as ``role: content`` lines, else JSON."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt):
        return "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in prompt)
    return json.dumps(prompt, ensure_ascii=False, default=str)


def check_lengths(prompts: Sequence, completions: Sequence, **columns: Sequence | None) -> None:
    """Raise ConfigError unless every given column has one entry per completion."""
    n = len(completions)
    for name, col in {"prompts": prompts, **columns}.items():
        if col is not None and len(col) != n:
            raise ConfigError(f"{name} has {len(col)} entries but there are {n} completions")


def judge_metrics(results: Sequence[JudgeResult]) -> dict[str, float]:
    """``invalid_frac`` (share of results without a value) and ``cached_frac`` (cache hits)."""
    if not results:
        return {}
    n = len(results)
    return {
        "invalid_frac": sum(r.value is None for r in results) / n,
        "cached_frac": sum(r.cached for r in results) / n,
    }
