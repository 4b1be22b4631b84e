"""Tool calls out of one assistant turn, and their arguments checked against a tool's schema.

`parse_tool_calls` turns a turn's decoded text into the `ToolCall`s and `parse_errors` of a `Turn`.
It never raises on model output: each bad call is an error `"<kind>: tool call <n>: <detail>"`,
`<kind>` one of PARSE_ERROR_KINDS (`error_kind` reads it back). Whether names are tools and values
fit is the environment's business (`validate_arguments` checks values against a tool's schema).
Hermes format (Qwen and others; several calls per turn, text around them and newlines inside the
tags allowed): `<tool_call>{"name": "multiply", "arguments": {"a": 3, "b": 4}}</tool_call>`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from functools import cache
from typing import Any

from posttrain.envs.base import ToolCall
from posttrain.envs.schema import json_type
from posttrain.errors import ConfigError, did_you_mean

# unclosed_tag: `<tool_call>` without `</tool_call>`; empty: nothing between the tags;
# truncated_json: the JSON ends before its object does; not_object: valid JSON, not an object;
# missing_name: none or ""; bad_arguments: neither an object nor a JSON string of one; rejected:
# vLLM's parser refused a call these checks accept (never seen with vLLM 0.32).
PARSE_ERROR_KINDS = (
    "unclosed_tag", "empty", "truncated_json", "invalid_json", "not_object",
    "missing_name", "bad_name", "missing_arguments", "bad_arguments", "rejected",
)  # fmt: skip
# The pattern of vLLM's Hermes2ProToolParser.tool_call_regex: a closed call, or an unclosed one
# running to the end of the text. Both paths split a turn into the same calls with it.
HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
_QUIET = threading.local()


def error_kind(error: str) -> str:
    """The kind of a parse error message (one of PARSE_ERROR_KINDS).

    Args:
        error: a message from `parse_tool_calls` or `parse_hermes`.

    Returns:
        The text before its first colon.
    """
    return error.partition(":")[0]


def _error(kind: str, index: int, detail: str) -> str:
    """One parse error message: `<kind>: tool call <index + 1>: <detail>`."""
    return f"{kind}: tool call {index + 1}: {detail}"


def _arguments(value: Any, decodes: int = 1) -> dict[str, Any] | None:
    """A call's "arguments" as a mapping: an object, or a JSON string of one (`decodes`: how many
    JSON string layers to undo; 2 for vLLM's arguments text, itself JSON); else None."""
    for _ in range(decodes):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                return None
    return value if isinstance(value, dict) else None


def _hermes_call(body: str, closed: bool, index: int) -> ToolCall | str:
    """Parse the text after `<tool_call>` (`index`: its 0-based place in the turn): up to
    `</tool_call>` when `closed`, else to the end of the turn. Returns the call or its error."""
    body = body.strip()
    if not closed:
        return _error("unclosed_tag", index, "no </tool_call> after <tool_call>")
    if not body:
        return _error("empty", index, "nothing between <tool_call> and </tool_call>")
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        kind = "truncated_json" if e.pos >= len(body) else "invalid_json"
        return _error(kind, index, f"{e.msg} at character {e.pos} of its JSON")
    except RecursionError:
        return _error("invalid_json", index, "JSON nested too deeply")
    if not isinstance(obj, dict):
        got = json_type(obj)
        return _error("not_object", index, f'expected {{"name": ..., "arguments": ...}}, got {got}')
    if "name" not in obj or obj["name"] == "":
        return _error("missing_name", index, 'no "name"')
    if not isinstance(obj["name"], str):
        return _error("bad_name", index, f'"name" must be a string, got {obj["name"]!r:.60}')
    if "arguments" not in obj:
        return _error("missing_arguments", index, 'no "arguments" (use {} for none)')
    args = _arguments(obj["arguments"])
    if args is None:
        detail = f'"arguments" must be an object, got {obj["arguments"]!r:.60}'
        return _error("bad_arguments", index, detail)
    return ToolCall(name=obj["name"], arguments=args)


def parse_hermes(text: str) -> tuple[list[ToolCall], list[str]]:
    """Parse Hermes-format tool calls in pure Python (regex on the tags, then `json.loads`).

    `parse_tool_calls` uses it when vLLM is not importable (the HF engine on machines without
    vLLM) or cannot be used with the tokenizer given (None); with vLLM, its checks run first on
    each call and their messages are the errors reported.

    Args:
        text: one assistant turn's decoded text.

    Returns:
        (calls in order, one error message per call that could not be parsed).
    """
    return _hermes(text, None)


def _hermes(text: str, parser: Any) -> tuple[list[ToolCall], list[str]]:
    """Hermes calls, each checked by `_hermes_call`; with vLLM's hermes `parser` (not None),
    each call that passes is then handed to it alone and its result is the one returned.

    vLLM's parser alone is all-or-nothing (one malformed call drops every call of the turn,
    silently) and lax (it takes an unclosed tag, any "arguments" value, an empty name).
    """
    calls: list[ToolCall] = []
    errors: list[str] = []
    for i, match in enumerate(HERMES_CALL.finditer(text)):
        closed = match.group(1) is not None
        out = _hermes_call(match.group(1) if closed else match.group(2), closed, i)
        if parser is not None and not isinstance(out, str):
            found = _extract(parser, match.group(0))
            args = _arguments(found[0][1], decodes=2) if len(found) == 1 else None
            rejected = _error("rejected", i, "vLLM's hermes parser could not parse it")
            out = rejected if args is None else ToolCall(name=found[0][0], arguments=args)
        (errors if isinstance(out, str) else calls).append(out)
    return calls, errors


class _QuietFilter(logging.Filter):
    """Drops vLLM parser log records while this thread is inside `_extract` (its tracebacks
    for malformed calls would flood the training log; the calls come back as errors)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep `record` unless this thread is inside `_extract`."""
        return not getattr(_QUIET, "on", False)


@cache
def _vllm_parser_class(name: str) -> Any:
    """vLLM's tool parser class registered as `name`, or None when vLLM cannot be imported."""
    try:
        from vllm.tool_parsers import ToolParserManager
    except Exception:  # not installed, or broken (missing CUDA libraries...)
        return None
    try:
        cls = ToolParserManager.get_tool_parser(name)
    except KeyError:
        hint = did_you_mean(name, ToolParserManager.list_registered())
        raise ConfigError(f"tool parser {name!r} is not one of vLLM's{hint}") from None
    logger = logging.getLogger(cls.__module__)
    if not any(isinstance(f, _QuietFilter) for f in logger.filters):
        logger.addFilter(_QuietFilter())
    return cls


@cache
def _request() -> Any:
    """The minimal chat request `extract_tool_calls` takes (parsers read `tools` at most; None
    where this vLLM keeps the class elsewhere: hermes's non-streaming path never reads it)."""
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    except ImportError:
        return None
    return ChatCompletionRequest(messages=[], model="posttrain")


def _extract(parser: Any, text: str) -> list[tuple[str, str]]:
    """(name, arguments JSON) of each call vLLM's `parser` finds in `text`; [] if it fails."""
    _QUIET.on = True
    try:
        info = parser.extract_tool_calls(text, _request())
        return [(c.function.name, c.function.arguments) for c in info.tool_calls or []]
    except Exception:  # a parser bug must not end the run: its calls are reported as errors
        return []
    finally:
        _QUIET.on = False


def _parse_vllm(text: str, parser: Any) -> tuple[list[ToolCall], list[str]]:
    """Calls through a non-hermes vLLM parser on the whole turn (malformed ones may be dropped
    by it without a trace); "arguments" must still decode to an object."""
    calls: list[ToolCall] = []
    errors: list[str] = []
    for i, (name, raw) in enumerate(_extract(parser, text)):
        args = _arguments(raw, decodes=2)
        if not name:
            errors.append(_error("missing_name", i, 'no "name"'))
        elif args is None:
            errors.append(_error("bad_arguments", i, f"arguments must be an object: {raw!r:.60}"))
        else:
            calls.append(ToolCall(name=name, arguments=args))
    return calls, errors


def _vllm_parser(name: str, tokenizer: Any) -> Any:
    """vLLM's parser `name` built with `tokenizer`; None where "hermes" falls back to Python."""
    cls = _vllm_parser_class(name)
    if cls is not None and tokenizer is not None:
        try:
            return cls(tokenizer)
        except Exception as e:  # e.g. the parser's special tokens are not in the vocab
            if name != "hermes":
                raise ConfigError(f"tool parser {name!r} refuses this tokenizer: {e}") from e
    if name != "hermes":
        why = "vLLM is not importable" if cls is None else "no tokenizer was given"
        raise ConfigError(f"tool parser {name!r} needs vLLM's parser, but {why}")
    return None


def parse_tool_calls(
    text: str, parser: str = "hermes", tokenizer: Any = None
) -> tuple[list[ToolCall], list[str]]:
    """The tool calls in one assistant turn, and one error message per call that failed.

    Which parser runs: vLLM's `parser` (`vllm.tool_parsers.ToolParserManager`) when vLLM imports
    and the parser can be built with `tokenizer`. Hermes's only needs some tokenizer (its
    non-streaming path reads text, not ids: a char-level one without `<tool_call>` tokens works);
    each call goes to it alone, after `parse_hermes`'s checks, so a bad call costs only itself
    and is reported. `parse_hermes` (pure Python) runs for "hermes" when `tokenizer` is None
    (vLLM is then not imported), vLLM does not import, or its parser refuses the tokenizer; both
    give the same results. Other parsers need vLLM and a tokenizer they accept (else ConfigError,
    a setup problem: call once with "" to check); calls they drop silently are not reported.

    Args:
        text: the assistant turn's decoded text (special tokens skipped, tool-call tags kept).
        parser: a vLLM tool parser name ("hermes", "pythonic", ...).
        tokenizer: the policy's tokenizer (what vLLM's parser is built with), or None.

    Returns:
        (calls in order as parsed, names unchecked; error messages, see PARSE_ERROR_KINDS).

    Raises:
        ConfigError: `parser` is unknown to vLLM, or not "hermes" and cannot be used here.
    """
    if parser == "hermes" and tokenizer is None:
        return parse_hermes(text)
    instance = _vllm_parser(parser, tokenizer)
    if instance is None:
        return parse_hermes(text)
    if parser == "hermes":
        return _hermes(text, instance)
    return _parse_vllm(text, instance)
