"""Structured-output rewards: valid JSON, JSON matching a JSON Schema (``jsonschema`` library)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

__all__ = ["extract_json_text", "json_schema", "json_valid"]

logger = logging.getLogger("posttrain.rewards")

_FENCE_RE = re.compile(r"\s*```(?:json|JSON)?\s*\n(.*?)\n?\s*```\s*", re.DOTALL)
_MISSING = object()


def extract_json_text(completion: str, allow_fences: bool = True) -> str:
    """The completion stripped, without a surrounding Markdown code fence when ``allow_fences``."""
    if allow_fences:
        m = _FENCE_RE.fullmatch(completion)
        if m:
            return m.group(1).strip()
    return completion.strip()


def _load(completion: str, allow_fences: bool) -> Any:
    """Parsed JSON value, or ``_MISSING`` when the completion is not valid JSON."""
    try:
        return json.loads(extract_json_text(completion, allow_fences))
    except ValueError:  # json.JSONDecodeError is a ValueError
        return _MISSING


def json_valid(
    prompts: list[str], completions: list[str], allow_fences: bool = True, **_: Any
) -> list[float]:
    """1.0 if the whole completion (optionally inside one ```json fence) is JSON, else 0.0."""
    return [0.0 if _load(c, allow_fences) is _MISSING else 1.0 for c in completions]


def _schema_for(schema: Any, i: int) -> Any:
    """Schema of sample ``i``: a list means one schema per sample (a column); JSON strings load."""
    s = schema[i] if isinstance(schema, list) else schema
    if isinstance(s, str):
        s = json.loads(s)
    return s


def json_schema(
    prompts: list[str],
    completions: list[str],
    schema: Any = None,
    allow_fences: bool = True,
    **_: Any,
) -> list[float | None]:
    """1.0 if the completion is JSON that validates against the schema, else 0.0.

    Args:
        schema: One schema for all samples (``dict``/JSON string, e.g. a spec kwarg) or [N] schemas
            (a dataset column named ``schema``).
        allow_fences: Accept the JSON inside a single Markdown code fence.

    Returns:
        [N] scores; ``None`` for a sample whose schema is missing or is not a valid JSON Schema.
    """
    import jsonschema

    if schema is None:
        raise ValueError("json_schema needs a 'schema' column or kwarg (a JSON Schema dict)")
    if isinstance(schema, list) and len(schema) != len(completions):
        raise ValueError(f"json_schema: {len(schema)} schemas for {len(completions)} completions")
    cache: dict[str, Any] = {}
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        try:
            validator = _validator(_schema_for(schema, i), cache)
        except (ValueError, TypeError, jsonschema.SchemaError) as e:
            logger.warning("json_schema: sample %d has an invalid schema: %s", i, e)
            out.append(None)
            continue
        value = _load(completion, allow_fences)
        if value is _MISSING:
            out.append(0.0)
            continue
        out.append(1.0 if validator.is_valid(value) else 0.0)
    return out


def _validator(s: Any, cache: dict[str, Any]) -> Any:
    """A checked validator for schema ``s`` (cached by its JSON text within one call)."""
    import jsonschema

    if not isinstance(s, dict | bool):
        raise TypeError(f"schema must be an object or boolean, got {type(s).__name__}")
    key = json.dumps(s, sort_keys=True, default=str)
    if key not in cache:
        validator_cls = jsonschema.validators.validator_for(s)
        validator_cls.check_schema(s)
        cache[key] = validator_cls(s)
    return cache[key]
