"""Tool environments: plain typed Python functions with Google docstrings become the model's tools.

A `ToolEnv` subclass lists its tools (class attribute `tools`, or the `tools` constructor
argument: bound methods of the instance give per-episode state, one instance per episode) and
implements `reset(row)`; it may override `final_reward()`. `step(turn)` runs the turn's tool calls
in order and answers each with one `{"role": "tool", "name": ..., "content": ...}` message; a turn
without tool calls (and without parse errors) is the final answer and ends the episode.

Every failure becomes an error observation the model sees, with its outcome kind counted in
`StepResult.tool_outcomes` (see `CALL_OUTCOMES`): an unknown tool, arguments that do not match the
tool's JSON schema, a tool that raises, a tool running past `tool_timeout_s`, and a call the
rollout layer could not parse (`Turn.parse_errors`; that message has no `name`).

Timeouts: each call runs in a fresh daemon worker thread that is abandoned when it runs past the
limit. A thread cannot be killed, so a hung Python tool keeps its thread (and whatever it holds)
until it returns by itself: tools should be quick and pure-Python. CPU-heavy or untrusted code
belongs in the sandbox tool (`python_tool`), whose subprocess is killed at its own limit.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from posttrain.envs.base import StepResult, ToolCall, Turn
from posttrain.envs.schema import validate_arguments
from posttrain.errors import ConfigError

__all__ = ["ToolEnv", "python_tool", "run_python", "tool_call_text", "tool_schema"]

_SCHEMAS: dict[Any, dict[str, Any]] = {}  # function (a bound method's __func__) -> JSON schema
_SCHEMA_LOCK = threading.Lock()


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of one tool, from `transformers.utils.get_json_schema` (cached per function).

    Args:
        fn: a typed function (or bound method) with a Google-style docstring.

    Returns:
        `{"type": "function", "function": {"name", "description", "parameters", ...}}`.
    """
    key = getattr(fn, "__func__", fn)
    with _SCHEMA_LOCK:
        if key not in _SCHEMAS:
            from transformers.utils import get_json_schema

            _SCHEMAS[key] = get_json_schema(fn)
        return _SCHEMAS[key]


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    """One hermes-format tool call, as an assistant writes it (SFT transcripts use this)."""
    call = json.dumps({"name": name, "arguments": arguments})
    return f"<tool_call>\n{call}\n</tool_call>"


def _as_text(value: Any) -> str:
    """A tool's return value as observation text (strings as-is, the rest as JSON or str)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


class _ToolTimeoutError(Exception):
    """A tool call ran past the environment's limit (distinct from a TimeoutError it raises)."""


def _run_with_timeout(
    fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float
) -> tuple[Any, BaseException | None]:
    """Call `fn(**kwargs)` in a daemon thread: (value, None), or (None, what it raised).

    Raises:
        _ToolTimeoutError: the call ran past `timeout_s` (its thread is left running: Python
            threads cannot be killed).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(**kwargs)
        except BaseException as e:  # reported to the model, never raised in the worker
            box["error"] = e

    worker = threading.Thread(target=target, daemon=True, name=f"tool-{fn.__name__}")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise _ToolTimeoutError
    return box.get("value"), box.get("error")


class ToolEnv:
    """Base class of tool environments (subclass it once; implement `reset`).

    Attributes:
        tools: the tool functions (plain typed functions with Google docstrings).
        tool_timeout_s: wall-clock limit of one tool call.
        tool_output_chars: longest observation text; longer ones are cut with a marker.
        final_text: the final answer's text once the episode is done (None before).
        done: whether the final answer was given.
    """

    tools: Sequence[Callable[..., Any]] = ()

    def __init__(
        self,
        tools: Sequence[Callable[..., Any]] | None = None,
        *,
        tool_timeout_s: float = 10.0,
        tool_output_chars: int = 2000,
    ) -> None:
        """Set the tools and limits.

        Args:
            tools: the tool functions (names must differ); default the class attribute `tools`.
            tool_timeout_s: wall-clock limit of one call (then "error: timed out after N s").
            tool_output_chars: cap on one observation's text (then "...[truncated N chars]").

        Raises:
            ConfigError: a limit is not positive, or two tools share a name.
        """
        if tool_timeout_s <= 0 or tool_output_chars < 1:
            raise ConfigError(
                f"tool_timeout_s={tool_timeout_s!r} and tool_output_chars={tool_output_chars!r}"
                " must be positive"
            )
        self.tools = list(type(self).tools if tools is None else tools)
        self.tool_timeout_s = float(tool_timeout_s)
        self.tool_output_chars = int(tool_output_chars)
        self._by_name = {tool_schema(fn)["function"]["name"]: fn for fn in self.tools}
        if len(self._by_name) != len(self.tools):
            raise ConfigError(f"{type(self).__name__}: two tools share a name: {self.tools}")
        self.final_text: str | None = None
        self.done = False

    def schemas(self) -> list[dict[str, Any]]:
        """The tools' JSON schemas (what `apply_chat_template(tools=...)` renders)."""
        return [tool_schema(fn) for fn in self.tools]

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Start the episode from a dataset row; return its first chat messages."""
        raise NotImplementedError(f"{type(self).__name__} must implement reset(row)")

    def final_reward(self) -> float | None:
        """The episode's reward (None: score `final_text` with the rewards registry)."""
        return None

    def step(self, turn: Turn) -> StepResult:
        """Run the turn's tool calls in order (then one error per parse error), or end the episode.

        Args:
            turn: the assistant turn with its parsed tool calls.

        Returns:
            One tool message per call and per parse error with their outcomes; a turn without
            calls or parse errors is the final answer: no messages, done=True, reward None.
        """
        if self.done:
            raise RuntimeError(f"{type(self).__name__}: step() after the episode ended")
        if not turn.tool_calls and not turn.parse_errors:
            self.final_text, self.done = turn.text, True
            return StepResult(done=True)
        result = StepResult()
        start = time.monotonic()
        for call in turn.tool_calls:
            outcome, text = self._call(call)
            result.messages.append({"role": "tool", "name": call.name, "content": self._cap(text)})
            result.tool_outcomes.append(outcome)
        for error in turn.parse_errors:
            text = self._cap(f"error: malformed tool call: {error}")
            result.messages.append({"role": "tool", "content": text})
            result.tool_outcomes.append("malformed")
        result.tool_seconds = time.monotonic() - start
        return result

    def _call(self, call: ToolCall) -> tuple[str, str]:
        """(outcome, observation text) of one call."""
        fn = self._by_name.get(call.name)
        if fn is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            return "unknown_tool", f"error: unknown tool {call.name!r}; known tools: {known}"
        problem = validate_arguments(call, tool_schema(fn))
        if problem is not None:
            return "bad_arguments", f"error: bad arguments: {problem}"
        try:
            value, error = _run_with_timeout(fn, dict(call.arguments), self.tool_timeout_s)
        except _ToolTimeoutError:
            return "timeout", f"error: timed out after {self.tool_timeout_s:g} s"
        if error is not None:
            return "error", f"error: {type(error).__name__}: {error}"
        return "ok", _as_text(value)

    def _cap(self, text: str) -> str:
        """`text` cut to `tool_output_chars` with a "...[truncated N chars]" marker."""
        cut = len(text) - self.tool_output_chars
        return text if cut <= 0 else f"{text[: self.tool_output_chars]}...[truncated {cut} chars]"


def _describe_run(res: Any, timeout_s: float) -> str:
    """A sandbox RunResult as text: exit status line, then non-empty stdout / stderr."""
    if res.reason is not None and res.reason.startswith("sandbox_error"):
        raise RuntimeError(f"the sandbox failed: {res.reason}")
    if res.reason in ("timeout", "cpu_limit"):
        status = f"timed out after {timeout_s:g} s"
    else:
        status = f"exit code {res.returncode}" + (f" ({res.reason})" if res.reason else "")
    parts = [status]
    parts += [
        f"{name}:\n{out.rstrip()}"
        for name, out in (("stdout", res.stdout), ("stderr", res.stderr))
        if out.strip()
    ]
    return "\n".join(parts)


def python_tool(
    timeout_s: float = 5.0, *, memory_mb: int = 256, output_bytes: int = 16_000
) -> Callable[[str], str]:
    """A `run_python(code)` tool that runs code in the sandbox (rewards/sandbox.py).

    Keep `timeout_s` below the environment's `tool_timeout_s` (the sandbox kills its process
    tree at `timeout_s`; the caller waits up to 3 s more), so the program's own timeout is what
    the model sees.

    Args:
        timeout_s: wall-clock and CPU limit of one program.
        memory_mb: address-space limit of the program.
        output_bytes: cap on each of stdout and stderr (the run is killed past it).

    Returns:
        The tool function (named `run_python`, typed, with a Google docstring).
    """

    def run_python(code: str) -> str:
        """Run a Python program in a sandbox; returns its exit status, stdout and stderr.

        Args:
            code: The Python source of the program; print what you want to see.
        """
        from rewards.sandbox import run_python as sandboxed

        res = sandboxed(
            code,
            cpu_seconds=timeout_s,
            wall_seconds=timeout_s,
            memory_mb=memory_mb,
            output_bytes=output_bytes,
        )
        return _describe_run(res, timeout_s)

    return run_python


run_python = python_tool()
