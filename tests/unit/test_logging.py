"""posttrain.runtime.logging: metrics.jsonl, wandb offline/disabled, ranks, progress, PNG curves."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from posttrain.errors import ConfigError
from posttrain.runtime.logging import RunLogger, plot_curves, progress, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """Rank 0, and WANDB_* variables restored after each test (the logger sets them)."""
    monkeypatch.delenv("RANK", raising=False)
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT"):
        monkeypatch.setenv(name, "")


def lines_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_with_wandb_disabled_never_imports_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would raise ImportError
    logger = RunLogger(tmp_path / "run", wandb_mode="disabled", config={"lr": 1e-3})
    logger.log(1, {"loss": 0.5, "count": 3, "flag": True, "np": np.float32(0.25)})
    logger.log(2, {"loss": math.nan, "inf": math.inf})
    # flushed line by line: readable before close
    assert lines_of(tmp_path / "run" / "metrics.jsonl") == [
        {"step": 1, "loss": 0.5, "count": 3.0, "flag": 1.0, "np": 0.25},
        {"step": 2, "loss": None, "inf": None},
    ]
    logger.close()
    logger.close()  # idempotent
    raw = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    assert not (tmp_path / "run" / "wandb").exists()


def test_log_appends_across_loggers_and_checks_values(tmp_path):
    with RunLogger(tmp_path, wandb_mode="disabled") as logger:
        logger.log(1, {"a": 1.0})
    with RunLogger(tmp_path, wandb_mode="disabled") as logger:
        logger.log(2, {"a": 2.0})
        with pytest.raises(TypeError, match="'name'"):
            logger.log(3, {"name": "text"})
        with pytest.raises(ValueError, match="'step'"):
            logger.log(3, {"step": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_torch_scalars_are_logged_as_floats(tmp_path):
    torch = pytest.importorskip("torch")
    with RunLogger(tmp_path, wandb_mode="disabled") as logger:
        logger.log(0, {"t": torch.tensor(1.5), "i": torch.tensor(2)})
    assert lines_of(tmp_path / "metrics.jsonl") == [{"step": 0, "t": 1.5, "i": 2.0}]


def test_wandb_offline_creates_run_dir(tmp_path):
    out = tmp_path / "run"
    logger = RunLogger(out, wandb_mode="offline", run_name="unit", config={"seed": 1})
    logger.log(1, {"loss": 1.0})
    logger.log(2, {"loss": math.nan})
    logger.close()
    assert [r["loss"] for r in read_metrics(out / "metrics.jsonl")] == [1.0, None]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].is_dir()
    assert list(runs[0].glob("*.wandb")), "the offline run should hold its .wandb log"


def test_non_zero_rank_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with RunLogger(tmp_path / "run", wandb_mode="offline") as logger:
        logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()
    assert progress(5, desc="x").disable


def test_invalid_wandb_mode():
    with pytest.raises(ConfigError, match="wandb_mode='cloud'"):
        RunLogger("unused", wandb_mode="cloud")


def test_progress_bar():
    bar = progress(10, desc="train")
    assert bar.total == 10 and bar.desc.startswith("train") and bar.mininterval == 1.0
    bar.update(3)
    assert bar.n == 3
    bar.close()
    assert list(progress(range(4), desc="it")) == [0, 1, 2, 3]


def test_read_metrics_skips_truncated_last_line_only(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n\n{"step": 2, "a": null}\n{"step": 3, "a"')
    assert read_metrics(path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": None}]
    path.write_text('{"step": 1\n{"step": 2, "a": 1.0}\n')
    with pytest.raises(ConfigError, match="line 1"):
        read_metrics(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_metrics(tmp_path / "missing.jsonl")


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_curves_writes_png_atomically(tmp_path):
    with RunLogger(tmp_path, wandb_mode="disabled") as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": 1.0 / step, "reward/mean": step * 0.1})
        logger.log(6, {"loss": math.nan})
    jsonl = tmp_path / "metrics.jsonl"
    out = plot_curves(jsonl, tmp_path / "plots" / "curves.png", ["loss", "reward/mean"], "run")
    assert out == tmp_path / "plots" / "curves.png"
    two = png_size(out)
    with_missing = plot_curves(jsonl, tmp_path / "b.png", ["loss", "absent", "reward/mean"], "run")
    assert png_size(with_missing) == two  # missing keys are skipped, not drawn empty
    one = png_size(plot_curves(jsonl, tmp_path / "c.png", ["loss"]))
    assert one[0] < two[0]
    none = plot_curves(jsonl, tmp_path / "d.png", ["absent"])
    png_size(none)
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    from matplotlib.image import imread

    assert imread(out).shape[:2] == (two[1], two[0])
