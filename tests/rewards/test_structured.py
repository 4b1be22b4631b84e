"""Structured-output rewards: json_valid and json_schema."""

import json

import pytest

from rewards.structured import extract_json_text, json_schema, json_valid

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ('{"a": 1}', 1.0),
        ("  [1, 2, 3]\n", 1.0),
        ('```json\n{"a": 1}\n```', 1.0),
        ('```\n{"a": 1}\n```', 1.0),
        ("42", 1.0),
        ('"text"', 1.0),
        ("{'a': 1}", 0.0),
        ('{"a": 1,}', 0.0),
        ('Here it is: {"a": 1}', 0.0),
        ("", 0.0),
        ('{"a": 1} {"b": 2}', 0.0),
    ],
)
def test_json_valid(completion, expected):
    assert json_valid(["p"], [completion]) == [expected]


def test_json_valid_without_fences():
    assert json_valid(["p"], ['```json\n{"a": 1}\n```'], allow_fences=False) == [0.0]


def test_extract_json_text():
    assert extract_json_text('```json\n{"a": 1}\n```') == '{"a": 1}'
    assert extract_json_text("  {}  ") == "{}"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ('{"name": "Ada", "age": 36}', 1.0),
        ('```json\n{"name": "Ada", "age": 36}\n```', 1.0),
        ('{"name": "Ada"}', 0.0),
        ('{"name": "Ada", "age": -1}', 0.0),
        ('{"name": "Ada", "age": "36"}', 0.0),
        ('{"name": "Ada", "age": 36, "x": 1}', 0.0),
        ("not json", 0.0),
        ("[]", 0.0),
    ],
)
def test_json_schema_kwarg(completion, expected):
    assert json_schema(["p"], [completion], schema=SCHEMA) == [expected]


def test_json_schema_per_sample_column_and_json_string():
    schemas = [SCHEMA, json.dumps({"type": "array", "maxItems": 2}), {"type": "array"}]
    completions = ['{"name": "a", "age": 1}', "[1, 2, 3]", "[1, 2, 3]"]
    assert json_schema(["p"] * 3, completions, schema=schemas) == [1.0, 0.0, 1.0]


def test_json_schema_invalid_schema_is_none_not_zero():
    schemas = [{"type": "no-such-type"}, None, "{not json", SCHEMA]
    completions = ["{}", "{}", "{}", '{"name": "a", "age": 1}']
    assert json_schema(["p"] * 4, completions, schema=schemas) == [None, None, None, 1.0]


def test_json_schema_missing_schema_raises():
    with pytest.raises(ValueError, match="'schema' column or kwarg"):
        json_schema(["p"], ["{}"])
