"""Run logging: metrics.jsonl (one JSON object a line), wandb (offline by default), tqdm, PNG plots.

Only rank 0 writes (``RANK`` unset or ``"0"``); the other ranks get a logger that does nothing and a
disabled progress bar, so callers never branch on the rank.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError

WANDB_MODES = ("offline", "online", "disabled")
METRICS_FILE = "metrics.jsonl"


def is_rank_zero() -> bool:
    """True when this process should write logs (env ``RANK`` unset or ``"0"``)."""
    return os.environ.get("RANK", "0") in ("", "0")


def _to_float(key: str, value: Any) -> float | None:
    """A metric value as a float; NaN and +-inf become None (JSON null)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"metric {key!r} has non-numeric value {value!r}; log floats only")
    try:
        x = float(value)  # ints, bools, numpy scalars, 0-d / 1-element tensors
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {key!r} has non-numeric value {value!r}; log floats only") from e
    return x if math.isfinite(x) else None


class RunLogger:
    """Append metrics to ``out_dir/metrics.jsonl`` and to wandb.

    Args:
        out_dir: run directory (created); ``metrics.jsonl`` and, with wandb on, ``wandb/`` go here.
        wandb_mode: ``"offline"`` (default, no account needed; sync later with ``wandb sync``),
            ``"online"`` or ``"disabled"`` (wandb is not even imported).
        project: wandb project.
        run_name: wandb run name (None lets wandb choose).
        config: the run's config, stored with the wandb run.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        wandb_mode: str = "offline",
        project: str = "posttrain",
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb_mode={wandb_mode!r}; valid values are {WANDB_MODES}")
        self.out_dir = Path(out_dir)
        self.wandb_mode = wandb_mode
        self.project = project
        self.run_name = run_name
        self.config = dict(config or {})
        self.enabled = is_rank_zero()
        self.metrics_path = self.out_dir / METRICS_FILE
        self._file = None
        self._wandb_run: Any = None
        if self.enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._file = self.metrics_path.open("a", encoding="utf-8")

    def _wandb(self) -> Any:
        """The wandb run, started on first use; None when wandb is disabled or on other ranks."""
        if self._wandb_run is not None or not self.enabled or self.wandb_mode == "disabled":
            return self._wandb_run
        os.environ["WANDB_MODE"] = self.wandb_mode
        os.environ["WANDB_DIR"] = str(self.out_dir)
        os.environ["WANDB_SILENT"] = "true"
        import wandb

        self._wandb_run = wandb.init(
            project=self.project,
            name=self.run_name,
            config=self.config,
            dir=str(self.out_dir),
            mode=self.wandb_mode,
        )
        return self._wandb_run

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one line ``{"step": step, **metrics}`` (flushed) and log the same to wandb.

        Args:
            step: training step (an int).
            metrics: name -> number (floats, ints, bools, numpy/torch scalars). Non-finite values
                are written as JSON null.
        """
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError(
                "metrics must not contain the key 'step'; pass it as the step argument"
            )
        values = {str(k): _to_float(str(k), v) for k, v in metrics.items()}
        if self._file is None:
            raise RuntimeError(f"RunLogger for {str(self.out_dir)!r} is closed")
        self._file.write(json.dumps({"step": int(step), **values}, allow_nan=False) + "\n")
        self._file.flush()
        run = self._wandb()
        if run is not None:
            run.log({k: (math.nan if v is None else v) for k, v in values.items()}, step=int(step))

    def close(self) -> None:
        """Close metrics.jsonl and finish the wandb run (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable_or_total: Iterable[Any] | int | None = None, desc: str = "") -> Any:
    """A tqdm bar over an iterable or for a total count; updates at most once a second.

    Disabled on ranks other than 0.
    """
    from tqdm.auto import tqdm

    if isinstance(iterable_or_total, int):
        return tqdm(total=iterable_or_total, desc=desc, mininterval=1.0, disable=not is_rank_zero())
    return tqdm(iterable_or_total, desc=desc, mininterval=1.0, disable=not is_rank_zero())


def read_metrics(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl into a list of dicts (nulls come back as None).

    A truncated last line (a crash mid-write) is skipped; a broken line elsewhere raises.

    Raises:
        ConfigError: the file does not exist, or a line other than the last is not valid JSON.
    """
    path = Path(jsonl_path)
    if not path.is_file():
        raise ConfigError(f"metrics file {str(path)!r} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ConfigError(f"{str(path)!r} line {i + 1} is not valid JSON: {e}") from e
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a key, sorted by step; last value wins (resumed runs repeat steps)."""
    by_step: dict[int, float] = {}
    for row in rows:
        if key in row and "step" in row:
            value = row[key]
            by_step[int(row["step"])] = math.nan if value is None else float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_curves(
    jsonl_path: str | Path,
    png_path: str | Path,
    keys: list[str],
    title: str | None = None,
) -> Path:
    """Plot metrics from a metrics.jsonl file, one subplot per key, x = step.

    Keys absent from the file are skipped (a figure with only a note when none is present). The PNG
    is written to a temporary file and renamed, so readers never see a partial image.

    Args:
        jsonl_path: metrics file written by `RunLogger`.
        png_path: output image.
        keys: metric names to plot.
        title: figure title.

    Returns:
        ``png_path`` as a Path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(jsonl_path)
    series = {k: _series(rows, k) for k in keys}
    present = [k for k in keys if series[k][0]]
    ncols = max(1, min(3, len(present)))
    nrows = max(1, math.ceil(len(present) / ncols))
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if not present:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, f"no data for {keys}", ha="center", va="center", wrap=True)
    for i, key in enumerate(present):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        steps, values = series[key]
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
