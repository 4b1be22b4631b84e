"""A run's training and held-out rows, as its Config names them."""

from __future__ import annotations

from posttrain.config import Config
from posttrain.data.loading import load_rows


def load_train_eval_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """Training rows and held-out rows for a run."""
    d = cfg.data
    train = load_rows(
        d.source,
        prompt_column=d.prompt_column,
        split="train",
        n=d.train_size,
        seed=d.seed,
        task_kwargs=d.task if d.source == "arithmetic" else None,
    )
    return train, load_eval_rows(cfg)


def load_eval_rows(cfg: Config) -> list[dict]:
    """The held-out rows: `data.eval_source` (or `data.source`), split `test`, `eval_size` rows."""
    d = cfg.data
    eval_source = d.eval_source or d.source
    return load_rows(
        eval_source,
        prompt_column=d.prompt_column,
        split="test",
        n=d.eval_size,
        seed=d.seed,
        task_kwargs=d.task if eval_source == "arithmetic" else None,
    )
