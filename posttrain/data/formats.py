"""Datasets in their own column names: `data.columns`, `data.prompt_template`, derived columns.

Applied to every loaded row, in this order (`apply_format`):

1. `data.columns` (`{role: column}`, e.g. `{prompt: question, answer: solution}`) copies each
   named column to the role's key; the original columns stay, so a row of GSM8K becomes
   `{"question", "answer", "prompt"}`. An existing key of the role's name is replaced.
2. Derived columns for formats a reward reads under another name:
   - IFEval (`instruction_id_list` + `kwargs`, no `instructions`):
     `instructions = [{"kind": id, **kwargs}, ...]` (the ``ifeval`` reward's format);
   - HumanEval (`test` defining ``check(candidate)`` + `entry_point`): `tests` = the test code
     followed by ``check(<entry_point>)`` (also when `tests` was mapped from `test`: a test
     text that defines ``check`` and never calls it gets the call);
   - MBPP (`test_list` of assert strings, optional `test_imports` / `test_setup_code`, no
     `tests`): `tests` = the imports, the setup code and the asserts, one per line (the
     ``code_tests`` reward's assert-string format, one test per assert);
   - preference rows without a prompt whose `chosen` and `rejected` are message lists: the
     messages the two conversations share become the prompt (Anthropic HH / UltraFeedback).
3. `data.prompt_template` (e.g. ``"{question}\\nPut the final answer in \\boxed{}."``) is
   formatted from the row (loaded columns plus renamed keys) and written to
   `data.prompt_column`. Only `{identifier}` is a placeholder; `{{` and `}}` are literal braces
   and any other brace (``\\boxed{}``) is kept as written. Values are inserted with ``str()``.

Rewards then see the renamed and derived keys as columns (e.g. `answer` for ``math_answer``,
which takes the `#### N` tail or the last ``\\boxed{}`` of a reference solution as the gold).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from posttrain.config.checks import DATA_COLUMN_ROLES, TEMPLATE_FIELD
from posttrain.errors import ConfigError, did_you_mean

IFEVAL_COLUMNS = ("instruction_id_list", "kwargs")
_DEFINES_CHECK = re.compile(r"^def check\s*\(", re.MULTILINE)
_CALLS_CHECK = re.compile(r"^check\s*\(", re.MULTILINE)


def _available(row: Mapping[str, Any]) -> str:
    return ", ".join(map(str, row))


def rename_columns(
    rows: list[dict[str, Any]], columns: Mapping[str, str], source: str
) -> list[dict[str, Any]]:
    """Copy each mapped column to its role's key (originals kept).

    Args:
        rows: loaded rows (all with the same keys, as `datasets` gives them).
        columns: {role: column}; roles are `DATA_COLUMN_ROLES`.
        source: where the rows came from, for messages.

    Raises:
        ConfigError: an unknown role (closest valid one named) or a column the data lacks
            (names the column, the source and the available columns).
    """
    if not columns or not rows:
        return rows
    for role, column in columns.items():
        if role not in DATA_COLUMN_ROLES:
            raise ConfigError(
                f"data.columns: unknown role {role!r}"
                f"{did_you_mean(str(role), list(DATA_COLUMN_ROLES))}"
            )
        if column not in rows[0]:
            raise ConfigError(
                f"data.columns.{role}: column {column!r} is not in {source!r}; "
                f"available columns: {_available(rows[0])}"
            )
    return [{**row, **{role: row.get(col) for role, col in columns.items()}} for row in rows]


def template_fields(template: str) -> list[str]:
    """The `{column}` placeholders of a prompt template, in order (repeats kept)."""
    return [m.group(1) for m in TEMPLATE_FIELD.finditer(template) if m.group(1)]


def render_template(template: str, row: Mapping[str, Any]) -> str:
    """`template` with each `{column}` replaced by ``str(row[column])``.

    Raises:
        KeyError: a placeholder that is not a key of `row`.
    """

    def sub(match: Any) -> str:
        name = match.group(1)
        if name is None:
            return match.group(0)[0]  # "{{" -> "{", "}}" -> "}"
        return str(row[name])

    return TEMPLATE_FIELD.sub(sub, template)


def apply_template(
    rows: list[dict[str, Any]], template: str, prompt_column: str, source: str
) -> list[dict[str, Any]]:
    """Set `row[prompt_column]` to the template formatted from each row; its value before goes to
    `row["raw_" + prompt_column]`.

    Raises:
        ConfigError: a placeholder that is not a column (names it and the available columns).
    """
    if not rows:
        return rows
    for name in template_fields(template):
        if name not in rows[0]:
            raise ConfigError(
                f"data.prompt_template: placeholder {{{name}}} is not a column of {source!r}"
                f"{did_you_mean(name, list(map(str, rows[0])))}; "
                f"available columns: {_available(rows[0])}"
            )
    # the untemplated value stays readable (a task generator parses it: arithmetic's wrong answers)
    return [
        {
            **row,
            f"raw_{prompt_column}": row.get(prompt_column),
            prompt_column: render_template(template, row),
        }
        for row in rows
    ]


def _is_messages(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(m, dict) for m in value)


def implicit_prompt(chosen: Any, rejected: Any) -> list[dict[str, Any]] | None:
    """The messages two conversations share before they diverge (None if they share none).

    The shared prefix stops one short of the shorter list, so each side keeps a reply.
    """
    if not (_is_messages(chosen) and _is_messages(rejected)):
        return None
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return [dict(m) for m in chosen[:n]] or None


def ifeval_instructions(instruction_ids: Any, kwargs: Any) -> list[dict[str, Any]] | None:
    """A google/IFEval row's (`instruction_id_list`, `kwargs`) as ``ifeval`` instructions.

    Returns None when the two are not aligned lists (the row is then left as it is).
    """
    if hasattr(instruction_ids, "tolist"):
        instruction_ids = instruction_ids.tolist()
    if hasattr(kwargs, "tolist"):
        kwargs = kwargs.tolist()
    if not isinstance(instruction_ids, list | tuple) or not isinstance(kwargs, list | tuple):
        return None
    if len(instruction_ids) != len(kwargs):
        return None
    return [{"kind": k, **(kw or {})} for k, kw in zip(instruction_ids, kwargs, strict=True)]


def _listed(value: Any) -> list[Any]:
    if hasattr(value, "tolist"):
        value = value.tolist()  # numpy arrays from parquet
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def humaneval_tests(test: Any, entry_point: Any) -> Any:
    """HumanEval test code that defines ``check`` but never calls it, with the call added."""
    if not (isinstance(test, str) and isinstance(entry_point, str) and entry_point.isidentifier()):
        return test
    if not _DEFINES_CHECK.search(test) or _CALLS_CHECK.search(test):
        return test
    return f"{test.rstrip()}\n\n\ncheck({entry_point})\n"


def mbpp_tests(row: Mapping[str, Any]) -> str | None:
    """An MBPP row's imports, setup code and `test_list` asserts as one assert string."""
    asserts = _listed(row.get("test_list"))
    if not asserts or not all(isinstance(a, str) for a in asserts):
        return None
    setup = [*_listed(row.get("test_imports")), *_listed(row.get("test_setup_code"))]
    lines = [x for x in setup if isinstance(x, str) and x.strip()] + asserts
    return "\n".join(lines) + "\n"


def _derive_row(
    row: dict[str, Any], kinds: set[str], prompt_column: str, chosen: str, rejected: str
) -> dict[str, Any]:
    row = dict(row)
    if "ifeval" in kinds:
        row["instructions"] = ifeval_instructions(*(row[c] for c in IFEVAL_COLUMNS))
    if "mbpp" in kinds:
        row["tests"] = mbpp_tests(row)
    if "humaneval" in kinds:
        row["tests"] = humaneval_tests(row.get("tests", row.get("test")), row["entry_point"])
    if "pairs" in kinds:
        row[prompt_column] = implicit_prompt(row[chosen], row[rejected])
    return row


def derive_columns(
    rows: list[dict[str, Any]], prompt_column: str, chosen_column: str, rejected_column: str
) -> list[dict[str, Any]]:
    """Add the columns of the known formats (module docstring, step 2) where rows lack them."""
    if not rows:
        return rows
    keys = rows[0].keys()
    kinds = set()
    if "instructions" not in keys and all(c in keys for c in IFEVAL_COLUMNS):
        kinds.add("ifeval")
    if "tests" not in keys and "test_list" in keys:
        kinds.add("mbpp")
    if "entry_point" in keys and ("tests" in keys or "test" in keys):
        kinds.add("humaneval")
    if prompt_column not in keys and chosen_column in keys and rejected_column in keys:
        kinds.add("pairs")
    if not kinds:
        return rows
    return [_derive_row(r, kinds, prompt_column, chosen_column, rejected_column) for r in rows]


def apply_format(
    rows: Sequence[dict[str, Any]],
    *,
    source: str,
    columns: Mapping[str, str] | None = None,
    prompt_template: str | None = None,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
) -> list[dict[str, Any]]:
    """Rename, derive, then template (see the module docstring); returns new row dicts."""
    out = rename_columns(list(rows), columns or {}, source)
    out = derive_columns(out, prompt_column, chosen_column, rejected_column)
    if prompt_template is not None:
        out = apply_template(out, prompt_template, prompt_column, source)
    return out
