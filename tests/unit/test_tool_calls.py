"""Tool-call parsing (vLLM's hermes parser and the pure-Python fallback agree on one corpus; bad
calls always come back as errors, never as exceptions) and argument checks against schemas."""

from __future__ import annotations

import json
import random
import sys
from typing import Any

import pytest
from transformers.utils import get_json_schema

from posttrain.envs.base import ToolCall
from posttrain.envs.schema import validate_arguments
from posttrain.errors import ConfigError
from posttrain.models.tiny import build_tokenizer
from posttrain.rollout import tool_calls as tc


def _call(name: str, args: dict[str, Any], sep: str = "\n") -> str:
    """One well-formed Hermes call with a JSON object body."""
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"<tool_call>{sep}{body}{sep}</tool_call>"


MUL = _call("multiply", {"a": 3, "b": 4})
# id -> (text, expected calls as (name, arguments), expected error kinds in order)
CORPUS: dict[str, tuple[str, list[tuple[str, dict]], list[str]]] = {
    "no_calls": ("The answer is 12.", [], []),
    "single": (MUL, [("multiply", {"a": 3, "b": 4})], []),
    "no_newlines": (_call("f", {"x": 1}, sep=""), [("f", {"x": 1})], []),
    "no_arguments": (_call("now", {}), [("now", {})], []),
    "multiple": (
        MUL + "\n" + _call("add", {"a": 1, "b": 2}) + _call("now", {}),
        [("multiply", {"a": 3, "b": 4}), ("add", {"a": 1, "b": 2}), ("now", {})],
        [],
    ),
    "arguments_json_string": (
        '<tool_call>\n{"name": "f", "arguments": "{\\"x\\": [1, 2]}"}\n</tool_call>',
        [("f", {"x": [1, 2]})],
        [],
    ),
    "text_around": (
        "Let me compute that.\n" + MUL + "\nI will wait for the result.",
        [("multiply", {"a": 3, "b": 4})],
        [],
    ),
    "nested_braces_in_strings": (
        _call("run", {"code": "def f():\n    return {'a': [1, {2}]}", "s": "}{"}),
        [("run", {"code": "def f():\n    return {'a': [1, {2}]}", "s": "}{"})],
        [],
    ),
    "nested_objects": (
        _call("f", {"cfg": {"a": {"b": [1, {"c": None}]}}}),
        [("f", {"cfg": {"a": {"b": [1, {"c": None}]}}})],
        [],
    ),
    "unicode": (
        _call("translate", {"text": "héllo wörld ✓ 日本語 🙂"}),
        [("translate", {"text": "héllo wörld ✓ 日本語 🙂"})],
        [],
    ),
    "unknown_tool_is_parsed": (_call("no_such_tool", {"q": 1}), [("no_such_tool", {"q": 1})], []),
    "truncated_json": (
        '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}\n</tool_call>',
        [],
        ["truncated_json"],
    ),
    "invalid_json": (
        "<tool_call>{name: 'multiply', arguments: {}}</tool_call>",
        [],
        ["invalid_json"],
    ),
    "trailing_text_in_tag": (
        '<tool_call>{"name": "f", "arguments": {}} thanks</tool_call>',
        [],
        ["invalid_json"],
    ),
    "unclosed_tag_truncated": (
        'Sure. <tool_call>\n{"name": "multiply", "arguments": {"a": 3',
        [],
        ["unclosed_tag"],
    ),
    "unclosed_tag_complete_json": (
        '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}',
        [],
        ["unclosed_tag"],
    ),
    "unclosed_bare_tag": ("I'll call <tool_call>", [], ["unclosed_tag"]),
    "empty_tag": ("<tool_call></tool_call>", [], ["empty"]),
    "whitespace_tag": ("<tool_call>\n  \n</tool_call>", [], ["empty"]),
    "not_object_list": ('<tool_call>[{"name": "f"}]</tool_call>', [], ["not_object"]),
    "not_object_string": ('<tool_call>"multiply"</tool_call>', [], ["not_object"]),
    "missing_name": ('<tool_call>{"arguments": {"a": 1}}</tool_call>', [], ["missing_name"]),
    "empty_name": ('<tool_call>{"name": "", "arguments": {}}</tool_call>', [], ["missing_name"]),
    "name_not_string": ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', [], ["bad_name"]),
    "name_null": ('<tool_call>{"name": null, "arguments": {}}</tool_call>', [], ["bad_name"]),
    "missing_arguments": ('<tool_call>{"name": "now"}</tool_call>', [], ["missing_arguments"]),
    "arguments_list": (
        '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',
        [],
        ["bad_arguments"],
    ),
    "arguments_null": (
        '<tool_call>{"name": "f", "arguments": null}</tool_call>',
        [],
        ["bad_arguments"],
    ),
    "arguments_bad_string": (
        '<tool_call>{"name": "f", "arguments": "a=1"}</tool_call>',
        [],
        ["bad_arguments"],
    ),
    "arguments_string_of_list": (
        '<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>',
        [],
        ["bad_arguments"],
    ),
    "good_bad_good": (
        MUL + "<tool_call>{bad}</tool_call>" + _call("now", {}),
        [("multiply", {"a": 3, "b": 4}), ("now", {})],
        ["invalid_json"],
    ),
    "good_then_unclosed": (
        MUL + '\n<tool_call>{"name": "now", "arguments": {}}',
        [("multiply", {"a": 3, "b": 4})],
        ["unclosed_tag"],
    ),
    "all_bad": (
        '<tool_call></tool_call><tool_call>[]</tool_call><tool_call>{"name": 1}</tool_call>',
        [],
        ["empty", "not_object", "bad_name"],
    ),
}
IDS = list(CORPUS)


@pytest.fixture(scope="module")
def tok() -> Any:
    """The tiny char-level tokenizer (no `<tool_call>` token in its vocab)."""
    return build_tokenizer()


@pytest.fixture(scope="module")
def hermes(tok: Any) -> Any:
    """vLLM's own hermes parser, built with the tiny tokenizer."""
    pytest.importorskip("vllm.tool_parsers")
    from vllm.tool_parsers import ToolParserManager

    return ToolParserManager.get_tool_parser("hermes")(tok)


def _check(result: tuple[list[ToolCall], list[str]], case: str) -> None:
    """Assert a parse result matches the corpus case."""
    _, calls, kinds = CORPUS[case]
    got_calls, errors = result
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert [tc.error_kind(e) for e in errors] == kinds
    for i, e in enumerate(errors):
        assert e.startswith(f"{kinds[i]}: tool call "), e


def _raw_vllm(parser: Any, text: str) -> list[tuple[str, Any]]:
    """What vLLM's hermes parser alone returns for `text`: (name, decoded arguments) pairs."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    info = parser.extract_tool_calls(text, ChatCompletionRequest(messages=[], model="x"))
    return [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls]


@pytest.mark.parametrize("case", IDS)
def test_fallback_corpus(case: str) -> None:
    _check(tc.parse_hermes(CORPUS[case][0]), case)
    # without a tokenizer parse_tool_calls is the fallback, vLLM installed or not
    assert tc.parse_tool_calls(CORPUS[case][0]) == tc.parse_hermes(CORPUS[case][0])


@pytest.mark.parametrize("case", IDS)
def test_vllm_corpus_agrees_with_fallback(case: str, tok: Any, hermes: Any) -> None:
    result = tc.parse_tool_calls(CORPUS[case][0], "hermes", tokenizer=tok)
    _check(result, case)
    assert result == tc.parse_hermes(CORPUS[case][0])


def test_vllm_path_is_taken_with_a_char_level_tokenizer(tok: Any, hermes: Any) -> None:
    # `<tool_call>` is plain text to the tiny tokenizer, and vLLM's hermes parser still takes it
    assert "<tool_call>" not in tok.get_vocab()
    assert len(tok.encode("<tool_call>", add_special_tokens=False)) == len("<tool_call>")
    assert type(tc._vllm_parser("hermes", tok)).__name__ == type(hermes).__name__


@pytest.mark.parametrize("case", [c for c in IDS if not CORPUS[c][2]])
def test_raw_vllm_parser_agrees_on_well_formed_calls(case: str, hermes: Any) -> None:
    text, calls, _ = CORPUS[case]
    raw = [(n, tc._arguments(a)) for n, a in _raw_vllm(hermes, text)]
    assert raw == calls


def test_vllm_drops_a_whole_turn_for_one_bad_call_the_wrapper_does_not(
    tok: Any, hermes: Any
) -> None:
    text = CORPUS["good_bad_good"][0]
    assert _raw_vllm(hermes, text) == []  # vLLM: all-or-nothing, silently
    _check(tc.parse_tool_calls(text, tokenizer=tok), "good_bad_good")


@pytest.mark.parametrize(
    "case", ["missing_arguments", "name_not_string", "empty_tag", "not_object_list"]
)
def test_vllm_drops_malformed_calls_silently_the_wrapper_reports_them(
    case: str, tok: Any, hermes: Any
) -> None:
    assert _raw_vllm(hermes, CORPUS[case][0]) == []
    _check(tc.parse_tool_calls(CORPUS[case][0], tokenizer=tok), case)


@pytest.mark.parametrize(
    ("case", "vllm_args"),
    [
        ("unclosed_tag_complete_json", {"a": 3, "b": 4}),  # vLLM accepts an unclosed tag
        ("arguments_list", [1, 2]),  # vLLM passes any "arguments" value through
        ("arguments_null", None),
        ("empty_name", {}),
    ],
)
def test_vllm_accepts_what_the_wrapper_rejects(
    case: str, vllm_args: Any, tok: Any, hermes: Any
) -> None:
    raw = _raw_vllm(hermes, CORPUS[case][0])
    assert len(raw) == 1 and raw[0][1] == vllm_args
    _check(tc.parse_tool_calls(CORPUS[case][0], tokenizer=tok), case)


def test_never_raises_on_any_prefix_or_mutation(tok: Any, hermes: Any) -> None:
    rng = random.Random(0)
    texts = [t for t, _, _ in CORPUS.values()]
    texts += [t[:n] for t in texts[:12] for n in range(0, len(t), 3)]  # truncated mid-turn
    for t in list(texts[:40]):
        chars = list(t)
        for _ in range(3):
            if chars:
                chars[rng.randrange(len(chars))] = rng.choice('{}[]":,<>/ \\x')
        texts.append("".join(chars))
    deep = "[" * 100_000
    texts += [
        f"<tool_call>{deep}</tool_call>",
        f'<tool_call>{{"name": "f", "arguments": "{deep}"}}',
    ]
    texts.append(f'<tool_call>{{"name": "f", "arguments": "{deep}"}}</tool_call>')
    for text in texts:
        fallback = tc.parse_hermes(text)
        assert tc.parse_tool_calls(text, tokenizer=tok) == fallback
        calls, errors = fallback
        assert len(calls) + len(errors) == len(list(tc.HERMES_CALL.finditer(text)))


def test_without_vllm_hermes_falls_back(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # vLLM not importable (the HF engine on a machine without it): None in sys.modules makes
    # `import vllm.tool_parsers` raise ImportError
    monkeypatch.setitem(sys.modules, "vllm.tool_parsers", None)
    tc._vllm_parser_class.cache_clear()
    try:
        text = CORPUS["good_bad_good"][0]
        assert tc.parse_tool_calls(text, tokenizer=tok) == tc.parse_hermes(text)
        with pytest.raises(ConfigError, match="vLLM is not importable"):
            tc.parse_tool_calls(text, "pythonic", tok)
    finally:
        tc._vllm_parser_class.cache_clear()


def test_error_kind_names_every_kind() -> None:
    kinds = {tc.error_kind(e) for case in CORPUS.values() for e in tc.parse_hermes(case[0])[1]}
    assert kinds <= set(tc.PARSE_ERROR_KINDS)
    assert set(tc.PARSE_ERROR_KINDS) - kinds == {"rejected"}  # vLLM-only, unseen with 0.32


def test_other_vllm_parsers(tok: Any, hermes: Any) -> None:
    calls, errors = tc.parse_tool_calls('[f(a=1), g(b="x")]', "pythonic", tok)
    assert calls == [ToolCall("f", {"a": 1}), ToolCall("g", {"b": "x"})] and errors == []
    assert tc.parse_tool_calls("[f(a=1), g(b=", "pythonic", tok) == ([], [])  # dropped silently
    with pytest.raises(ConfigError, match="did you mean 'hermes'"):
        tc.parse_tool_calls("", "hermez", tok)
    with pytest.raises(ConfigError, match="refuses this tokenizer"):
        tc.parse_tool_calls("", "llama3_json", tok)  # needs <|python_tag|> in the vocab
    with pytest.raises(ConfigError, match="no tokenizer"):
        tc.parse_tool_calls("", "pythonic")


# ------------------------------------------------------------------------- validate_arguments
def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def search(
    query: str,
    limit: int = 10,
    weight: float = 1.0,
    tags: list[str] | None = None,
    exact: bool = False,
) -> list[str]:
    """Search the notes.

    Args:
        query: What to look for.
        limit: How many results at most.
        weight: How much to boost exact matches.
        tags: Only notes with all of these tags.
        exact: Match the whole query only.
    """
    return [query][:limit]


MUL_SCHEMA = get_json_schema(multiply)
SEARCH_SCHEMA = get_json_schema(search)


@pytest.mark.parametrize(
    ("schema", "args", "problems"),
    [
        (MUL_SCHEMA, {"a": 3, "b": 4}, []),
        (MUL_SCHEMA, {"a": 3}, ["missing required argument 'b'"]),
        (MUL_SCHEMA, {}, ["missing required argument 'a'", "missing required argument 'b'"]),
        (MUL_SCHEMA, {"a": 3, "b": 4, "c": 5}, ["unknown argument 'c'"]),
        (MUL_SCHEMA, {"a": 2.5, "b": 4}, ["argument 'a' must be integer, got number 2.5"]),
        (MUL_SCHEMA, {"a": 2.0, "b": 4}, ["argument 'a' must be integer, got number 2.0"]),
        (MUL_SCHEMA, {"a": "3", "b": 4}, ["argument 'a' must be integer, got string '3'"]),
        (MUL_SCHEMA, {"a": True, "b": 4}, ["argument 'a' must be integer, got boolean True"]),
        (MUL_SCHEMA, {"a": None, "b": 4}, ["argument 'a' must be integer, got null None"]),
        (SEARCH_SCHEMA, {"query": "x"}, []),
        (SEARCH_SCHEMA, {"query": "x", "weight": 2}, []),  # an int is a number
        (SEARCH_SCHEMA, {"query": "x", "tags": None, "exact": True, "limit": 3}, []),
        (SEARCH_SCHEMA, {"query": "x", "tags": ["a", "b"]}, []),
        (SEARCH_SCHEMA, {"query": "x", "tags": ["a", 2]}, ["argument 'tags[1]' must be string"]),
        (SEARCH_SCHEMA, {"query": "x", "tags": "a"}, ["argument 'tags' must be array"]),
        (SEARCH_SCHEMA, {"query": "x", "exact": "yes"}, ["argument 'exact' must be boolean"]),
        (SEARCH_SCHEMA, {"query": "x", "weight": "1"}, ["argument 'weight' must be number"]),
        (
            SEARCH_SCHEMA,
            {"limit": 1.5, "foo": 1},
            [
                "missing required argument 'query'",
                "argument 'limit' must be integer",
                "unknown argument 'foo'",
            ],
        ),
    ],
)
def test_validate_arguments(schema: dict, args: dict, problems: list[str]) -> None:
    call = ToolCall(schema["function"]["name"], args)
    error = validate_arguments(call, schema)
    if not problems:
        assert error is None
        return
    assert error is not None and error.startswith(f"{call.name}: ")
    parts = error.removeprefix(f"{call.name}: ").split("; ")
    assert len(parts) == len(problems)
    for part, expected in zip(parts, problems, strict=True):
        assert part.startswith(expected), (part, expected)


def test_validate_arguments_schema_forms_and_parsed_calls() -> None:
    bad = ToolCall("multiply", {"a": 1})
    for schema in (MUL_SCHEMA, MUL_SCHEMA["function"], MUL_SCHEMA["function"]["parameters"]):
        assert validate_arguments(bad, schema) == "multiply: missing required argument 'b'"
    (call,), _ = tc.parse_hermes(CORPUS["single"][0])
    assert validate_arguments(call, MUL_SCHEMA) is None
    enum = {"type": "object", "properties": {"u": {"type": "string", "enum": ["c", "f"]}}}
    assert "must be one of" in validate_arguments(ToolCall("t", {"u": "k"}), enum)
    union = {"type": "object", "properties": {"v": {"type": ["integer", "string"]}}}
    assert validate_arguments(ToolCall("t", {"v": "1"}), union) is None
    assert "integer or string" in validate_arguments(ToolCall("t", {"v": 1.5}), union)


def configure(name: str, limits: dict[str, int], mounts: list[tuple[str, bool]]) -> None:
    """Configure a job.

    Args:
        name: The job.
        limits: Resource limits by resource name.
        mounts: (path, read-only) pairs.
    """


def test_validate_arguments_nested_values() -> None:
    schema = get_json_schema(configure)
    ok = {"name": "j", "limits": {"cpu": 2}, "mounts": [["/data", True]]}
    assert validate_arguments(ToolCall("configure", ok), schema) is None
    bad = {"name": "j", "limits": {"cpu": 2.5}, "mounts": [["/data", "yes"]]}
    assert validate_arguments(ToolCall("configure", bad), schema) == (
        "configure: argument 'limits.cpu' must be integer, got number 2.5; "
        "argument 'mounts[0][1]' must be boolean, got string 'yes'"
    )
    nested = {
        "type": "object",
        "properties": {
            "cfg": {
                "type": "object",
                "properties": {"a": {"type": "integer"}},
                "required": ["a"],
                "additionalProperties": False,
            }
        },
    }
    assert validate_arguments(ToolCall("t", {"cfg": {"b": 1}}), nested) == (
        "t: missing required argument 'cfg.a'; unknown argument 'cfg.b'"
    )
