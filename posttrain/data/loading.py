"""Load prompt rows from a built-in task (arithmetic, shapes), a local json/jsonl/parquet file,
or a `datasets` name.

Every column is kept, so the extra ones (``answer``, ``tests``, ``rubric``...) reach reward
functions. A dataset in its own column names is mapped on load (`data.columns`,
`data.prompt_template`: see data/formats.py). A hub name may carry its config after a colon
(``openai/gsm8k:main`` is ``datasets.load_dataset("openai/gsm8k", "main")``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain.data import arithmetic, shapes
from posttrain.data.formats import apply_format
from posttrain.data.images import load_images
from posttrain.errors import ConfigError

ARITHMETIC = "arithmetic"
SHAPES = "shapes"
# the built-in synthetic tasks: generated, not read; `data.task` holds their options
BUILTIN_SOURCES = (ARITHMETIC, SHAPES)
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_MAX_LISTED = 10


def _local_format(source: str) -> str | None:
    """The `datasets` builder for a local file path, or None when ``source`` is not one."""
    return LOCAL_FORMATS.get(Path(source).suffix.lower())


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bar and no log records from `datasets` while it reads a local file: a file it
    cannot read is logged at ERROR and then raised, and the ConfigError says it once."""
    import datasets

    logger = logging.getLogger("datasets")
    level, bars = logger.level, not datasets.utils.are_progress_bars_disabled()
    logger.setLevel(logging.CRITICAL + 1)
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.utils.enable_progress_bars()


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _json_problem(text: str, suffix: str) -> str | None:
    """Where a .json/.jsonl text stops being rows of JSON objects (None: it looks fine).

    A .json file is one JSON document (a list of objects, or columns) or JSON Lines; a .jsonl
    file is one object per line. Lines are 1-based, as an editor shows them.
    """
    if suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as err:
            first = next((line for line in text.splitlines() if line.strip()), "")
            if not _is_json(first):  # one document, not JSON Lines
                return f"not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        else:
            if isinstance(whole, list):
                bad = next((i for i, row in enumerate(whole) if not isinstance(row, dict)), None)
                return None if bad is None else f"item {bad} of the list is not a JSON object"
            return None if isinstance(whole, dict) else "expected a list of JSON objects"
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return (
                f"line {lineno} is not valid JSON (column {err.colno}: {err.msg}); each line "
                "must be one JSON object"
            )
        if not isinstance(row, dict):
            return f'line {lineno} is not a JSON object ({{"prompt": ...}}): {line[:40]!r}'
    return None


def _load_local(path: Path, builder: str, data_files_split: str) -> list[dict]:
    import datasets

    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist (expected an existing file)")
    if path.stat().st_size == 0:
        raise ConfigError(f"data file {str(path)!r} is empty (expected at least one row)")
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(
                builder, data_files={data_files_split: str(path)}, split=data_files_split
            )
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
        where = None
        if builder == "json":  # name the line (datasets names a byte offset or a chunk's row)
            where = _json_problem(path.read_text(errors="replace"), path.suffix.lower())
        if where is not None:
            raise ConfigError(f"data file {str(path)!r}: {where}") from e
        cause = e.__cause__ or e
        raise ConfigError(f"could not read data file {str(path)!r} as {builder}: {cause}") from e
    return ds.to_list()


def split_config(source: str) -> tuple[str, str | None]:
    """(dataset name, config name or None) of ``name:config`` (a hub name has no colon)."""
    name, sep, config = source.partition(":")
    if not sep or Path(source).exists() or "/" in config or not (name and config):
        return source, None
    return name, config


def _load_named(source: str, split: str) -> list[dict]:
    import datasets

    name, config = split_config(source)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        raise ConfigError(
            f"dataset {source!r} (split {split!r}) could not be loaded: it is not 'arithmetic', "
            f"not a local .json/.jsonl/.parquet file, and `datasets` said: {e}"
        ) from e
    return ds.to_list()


def _is_empty(prompt: Any) -> bool:
    if prompt is None:
        return True
    if isinstance(prompt, str):
        return not prompt.strip()
    if isinstance(prompt, list):
        return not prompt
    return False


def check_prompts(rows: list[dict], prompt_column: str, source: str) -> None:
    """Raise ConfigError when the prompt column is missing or some prompts are empty.

    Args:
        rows: loaded rows.
        prompt_column: column holding the prompt (text or a list of chat messages).
        source: where the rows came from, for the message.
    """
    if not rows:
        raise ConfigError(f"data source {source!r} has no rows")
    columns = list(rows[0].keys())
    if prompt_column not in columns:
        raise ConfigError(
            f"data.prompt_column={prompt_column!r} is not a column of {source!r}; available: "
            f"{', '.join(map(str, columns))} (set data.prompt_column, or data.columns.prompt)"
        )
    empty = [i for i, row in enumerate(rows) if _is_empty(row.get(prompt_column))]
    if empty:
        shown = ", ".join(map(str, empty[:_MAX_LISTED])) + (
            " ..." if len(empty) > _MAX_LISTED else ""
        )
        raise ConfigError(
            f"{source!r}: {len(empty)} row(s) have an empty or missing {prompt_column!r} "
            f"(row index {shown}); fix or remove them"
        )


def load_rows(
    source: str,
    *,
    prompt_column: str = "prompt",
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    data_files_split: str = "train",
    task_kwargs: dict[str, Any] | None = None,
    columns: dict[str, str] | None = None,
    prompt_template: str | None = None,
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    n_name: str = "n",
    image_options: dict[str, Any] | None = None,
) -> list[dict]:
    """Load rows as a list of dicts, all columns kept.

    Args:
        source: ``"arithmetic"`` or ``"shapes"`` (the built-in synthetic tasks: data/arithmetic.py,
            data/shapes.py, rows with PIL images), a local ``.json``/``.jsonl``/
            ``.parquet`` file, or anything ``datasets.load_dataset(source, split=split)`` accepts
            (hub names when online, local dataset folders).
        prompt_column: column holding the prompt: text, or a list of ``{"role", "content"}``
            messages.
        split: split of the arithmetic task (``"train"``/``"test"``) or of a named dataset.
            A local file is always read whole, whatever ``split`` is.
        n: number of rows. For a file or named dataset, ``n`` rows are drawn by a shuffle seeded
            with ``seed``; ``None`` keeps all rows in file order. Required for a built-in task.
        seed: shuffle seed (and the arithmetic task's sampling seed).
        data_files_split: the split name under which a local file is registered with `datasets`.
        task_kwargs: extra keyword arguments for the built-in task's ``make_split`` (e.g.
            ``max_operand``, ``ops``; shapes: ``kind``, ``image_size``...).
        columns: ``{role: column}`` copied to the role's key on load (`data.columns`).
        prompt_template: formatted from each row into ``prompt_column`` (`data.prompt_template`).
        chosen_column, rejected_column: preference columns; rows without ``prompt_column``
            whose two are message lists get their shared messages as the prompt.
        n_name: what messages call ``n`` (the config key that set it, e.g. `data.train_size`).
        image_options: ``{"column", "max_images", "max_pixels"}`` for `images.load_images`: the
            drawn rows' image cells become lists of RGB PIL images (relative paths resolve
            against the data file's directory). None: image cells are left as loaded.

    Returns:
        The rows.

    Raises:
        ConfigError: missing file, missing prompt column (lists the available columns), empty
            prompts (lists their row indices), ``n`` larger than the data, a mapped column or
            template placeholder the data lacks.
    """
    fmt = {
        "columns": columns,
        "prompt_template": prompt_template,
        "prompt_column": prompt_column,
        "chosen_column": chosen_column,
        "rejected_column": rejected_column,
    }
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ConfigError(f"{n_name}={n!r} is not valid; use an integer >= 0 or null for all rows")
    if source in BUILTIN_SOURCES:
        rows = _builtin_rows(source, split, n, seed, task_kwargs, n_name)
        rows = apply_format(rows, source=source, **fmt)
        check_prompts(rows, prompt_column, source)
        return _with_images(rows, source, image_options, None, None)
    if task_kwargs:
        raise ConfigError(
            f"task_kwargs are only valid for the sources {list(BUILTIN_SOURCES)}, not {source!r}"
        )
    builder = _local_format(source)
    if builder is not None:
        rows = _load_local(Path(source).expanduser(), builder, data_files_split)
    else:
        rows = _load_named(source, split)
    rows = apply_format(rows, source=source, **fmt)
    check_prompts(rows, prompt_column, source)
    order = _draw(rows, n, seed, source, n_name)
    base_dir = Path(source).expanduser().parent if builder is not None else None
    rows = rows if order is None else [rows[i] for i in order]
    return _with_images(rows, source, image_options, base_dir, order)


def _builtin_rows(
    source: str,
    split: str,
    n: int | None,
    seed: int,
    task_kwargs: dict[str, Any] | None,
    n_name: str,
) -> list[dict]:
    """`n` rows of a built-in synthetic task's split (arithmetic or shapes)."""
    if n is None:
        raise ConfigError(
            f"{n_name} is required for source {source!r} (number of rows to generate)"
        )
    make_split = arithmetic.make_split if source == ARITHMETIC else shapes.make_split
    return make_split(split, n, seed, **(task_kwargs or {}))


def _with_images(
    rows: list[dict],
    source: str,
    image_options: dict[str, Any] | None,
    base_dir: Path | None,
    row_numbers: list[int] | None,
) -> list[dict]:
    """The rows with their image cells decoded (unchanged without `image_options`)."""
    if image_options is None:
        return rows
    return load_images(
        rows, source=source, base_dir=base_dir, row_numbers=row_numbers, **image_options
    )


def _draw(rows: list[dict], n: int | None, seed: int, source: str, n_name: str) -> list[int] | None:
    """Indices of `n` of the rows by a shuffle seeded with `seed` (None: all rows, in order)."""
    if n is None:
        return None
    if n > len(rows):
        raise ConfigError(
            f"{n_name}={n} exceeds the {len(rows)} rows of {source!r}; use {n_name} <= "
            f"{len(rows)}" + (" or null (all rows)" if n_name.endswith("train_size") else "")
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return order[:n]
