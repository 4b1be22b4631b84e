"""A tool call's arguments checked against the tool's JSON schema (`get_json_schema`)."""

from __future__ import annotations

from typing import Any

from posttrain.envs.base import ToolCall

_JSON_TYPES: dict[str, Any] = {  # boolean first: `json_type` names the first that fits
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def json_type(value: Any) -> str:
    """The JSON type name of a decoded value ("integer" for ints, "number" for floats)."""
    return next((name for name, fits in _JSON_TYPES.items() if fits(value)), type(value).__name__)


def _value_errors(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """What is wrong with `value` under a property schema (type, enum, items, nested objects)."""
    if value is None and schema.get("nullable"):
        return []
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    known = [t for t in types if t in _JSON_TYPES]
    if known and not any(_JSON_TYPES[t](value) for t in known):
        got = f"{json_type(value)} {value!r:.40}"
        return [f"argument {path!r} must be {' or '.join(known)}, got {got}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"argument {path!r} must be one of {schema['enum']}, got {value!r:.40}"]
    errors: list[str] = []
    if isinstance(value, list):
        prefix = schema.get("prefixItems", [])
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else schema.get("items")
            if isinstance(sub, dict):
                errors += _value_errors(item, sub, f"{path}[{i}]")
    elif isinstance(value, dict):
        errors += _object_errors(value, schema, path, closed=False)
    return errors


def _object_errors(
    obj: dict[str, Any], schema: dict[str, Any], path: str, closed: bool
) -> list[str]:
    """Required keys, unknown keys (when `closed` or additionalProperties is false), values."""
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties", not closed)
    dotted = f"{path}." if path else ""
    missing = [k for k in schema.get("required", []) if k not in obj]
    errors = [f"missing required argument {dotted + k!r}" for k in missing]
    for key, value in obj.items():
        if key in props:
            errors += _value_errors(value, props[key], dotted + key)
        elif extra is False:
            errors.append(f"unknown argument {dotted + key!r}")
        elif isinstance(extra, dict):
            errors += _value_errors(value, extra, dotted + key)
    return errors


def validate_arguments(call: ToolCall, schema: dict[str, Any]) -> str | None:
    """Check a call's arguments against its tool's JSON schema.

    Checks required keys present, no unknown keys (unless the schema allows them), and JSON
    types: integer (a float such as 2.0 is not one; bools are not numbers), number (ints are
    fine), string, boolean, array (items, prefixItems), object (nested properties); "nullable"
    and "enum" as `transformers.utils.get_json_schema` writes them.

    Args:
        call: the parsed call.
        schema: `get_json_schema(fn)` (the {"type": "function", ...} wrapper), its "function"
            part, or a bare parameters schema.

    Returns:
        One message listing every problem ("; "-joined), or None when the arguments fit.
    """
    params = schema.get("function", schema)
    params = params.get("parameters", params)
    errors = _object_errors(call.arguments, params, "", closed=True)
    return f"{call.name}: " + "; ".join(errors) if errors else None
