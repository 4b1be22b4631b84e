"""A run's training and held-out rows, as its Config names them."""

from __future__ import annotations

from typing import Any

from posttrain.config import Config
from posttrain.data.loading import BUILTIN_SOURCES, load_rows


def format_kwargs(cfg: Config) -> dict[str, Any]:
    """The `load_rows` arguments that map a dataset's own columns (data/formats.py) and decode its
    image column (data/images.py)."""
    d = cfg.data
    return {
        "prompt_column": d.prompt_column,
        "columns": dict(d.columns),
        "prompt_template": d.prompt_template,
        "chosen_column": d.chosen_column,
        "rejected_column": d.rejected_column,
        "image_options": {
            "column": d.image_column,
            "max_images": d.max_images_per_prompt,
            "max_pixels": d.max_image_pixels,
        },
    }


def load_train_eval_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """Training rows and held-out rows for a run."""
    d = cfg.data
    train = load_rows(
        d.source,
        split="train",
        n=d.train_size,
        seed=d.seed,
        task_kwargs=d.task if d.source in BUILTIN_SOURCES else None,
        n_name="data.train_size",
        **format_kwargs(cfg),
    )
    return train, load_eval_rows(cfg)


def load_eval_rows(cfg: Config) -> list[dict]:
    """The held-out rows: `data.eval_source` (or `data.source`), split `test`, `eval_size` rows.

    `data.columns` and `data.prompt_template` apply to both sources.
    """
    d = cfg.data
    eval_source = d.eval_source or d.source
    return load_rows(
        eval_source,
        split="test",
        n=d.eval_size,
        seed=d.seed,
        task_kwargs=d.task if eval_source in BUILTIN_SOURCES else None,
        n_name="data.eval_size",
        **format_kwargs(cfg),
    )
