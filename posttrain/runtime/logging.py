"""Run logging: metrics.jsonl (one JSON object a line), wandb (offline by default), tqdm, PNG plots,
and the quiet console (third-party logs to ``<output_dir>/third_party.log``).

Only rank 0 writes metrics (``RANK`` unset or ``"0"``); the other ranks get a logger that does
nothing and a disabled progress bar, so callers never branch on the rank.

Quiet console (`route_third_party`, `third_party_output`): what vLLM, DeepSpeed, transformers,
torch, Triton, datasets, httpx... log through Python logging, the warnings their own code issues,
and what they print (Python or C level) during the noisy setup calls, goes to
``<output_dir>/third_party.log`` instead of the console; ``verbose=True`` (``log.verbose``) shows
it on the console too. Every rank writes its own file: ``third_party.log`` on rank 0,
``third_party.rank{N}.log`` on rank N. Never hidden: posttrain's own logs and warnings, Python
tracebacks, posttrain's one-line errors, third-party records at ERROR and above, and what a
captured call printed before it raised (replayed to stderr). Records logged before the run
directory exists are held in memory and written once it does (a run that stops on a ConfigError
before creating it leaves nothing behind). Once routed, the process stays routed; a later run
writes to its own directory, a nested run (the SFT warm-up in ``<output_dir>/sft-warmup``) to its
parent's file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError
from posttrain.runtime.storage import append_line

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
        self._target: Path | None = None  # metrics.jsonl while open (rank 0)
        self._wandb_run: Any = None
        adopt_third_party_loggers()  # the loggers of libraries imported while the run was built
        if self.enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._target = self.metrics_path
            self._target.touch()

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
        if self._target is None:
            raise RuntimeError(f"RunLogger for {str(self.out_dir)!r} is closed")
        # one write, fsynced; a full disk ends the run with one line (nothing torn is left)
        append_line(self._target, json.dumps({"step": int(step), **values}, allow_nan=False) + "\n")
        run = self._wandb()
        if run is not None:
            run.log({k: (math.nan if v is None else v) for k, v in values.items()}, step=int(step))

    def close(self) -> None:
        """Close metrics.jsonl and finish the wandb run (safe to call twice)."""
        self._target = None
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

    adopt_third_party_loggers()
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
    return save_figure(fig, png_path)


def save_figure(fig: Any, png_path: str | Path) -> Path:
    """Write a matplotlib Figure as a PNG atomically (a temporary file, then a rename), so a
    reader never sees half an image; the parent directory is made if needed."""
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------- quiet console
THIRD_PARTY_LOG = "third_party.log"
# Top-level logger names sent to the third-party log (their child loggers too). Not wandb: it
# logs to its own debug.log in the run directory and never to the console.
THIRD_PARTY_LOGGERS = (
    "vllm",
    "DeepSpeed",
    "deepspeed",
    "torch",
    "transformers",
    "datasets",
    "huggingface_hub",
    "triton",
    "httpx",
    "httpcore",
    "urllib3",
    "filelock",
    "accelerate",
    "peft",
    "safetensors",
    "tokenizers",
    "matplotlib",
    "PIL",
    "fsspec",
    "dill",
    "numexpr",
    "openai",
    "aiohttp",
)
# vLLM's own line format, so its lines read the same in the file as on its console
_FORMAT = (
    "(%(processName)s pid=%(process)d) %(levelname)s %(asctime)s "
    "[%(filename)s:%(lineno)d] %(message)s"
)
_DATEFMT = "%m-%d %H:%M:%S"
_MAX_PENDING = 20_000  # lines held while the run directory does not exist yet
_POSTTRAIN_DIR = str(Path(__file__).resolve().parents[1])


def third_party_log_name(rank: int | None = None) -> str:
    """This rank's third-party log file name: ``third_party.log`` (rank 0), else
    ``third_party.rank{N}.log``; the rank defaults to env ``RANK``."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    return THIRD_PARTY_LOG if rank == 0 else f"third_party.rank{rank}.log"


class _RunFile(logging.Handler):
    """Appends to a run's third-party log; holds lines in memory while its directory is missing."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
        self.path: Path | None = None
        self._file: Any = None
        self._pending: list[str] = []

    def set_path(self, path: Path) -> None:
        with self.lock:
            if path == self.path:
                return
            if self._file is not None:
                self._file.close()
                self._file = None
            self.path = path

    def _open(self) -> Any:
        if self._file is None and self.path is not None and self.path.parent.is_dir():
            self._file = self.path.open("a", encoding="utf-8", errors="replace")
            self._file.write("".join(self._pending))
            self._pending.clear()
        return self._file

    def write(self, text: str) -> None:
        """Append raw text (a formatted record, a warning, captured output)."""
        with self.lock:
            f = self._open()
            if f is None:
                self._pending.append(text)
                del self._pending[:-_MAX_PENDING]
                return
            f.write(text)
            f.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock, contextlib.suppress(OSError):
            if self._open() is not None:
                self._file.flush()

    def close(self) -> None:
        with self.lock:
            self.flush()
            if self._file is not None:
                self._file.close()
                self._file = None
        super().close()


class _RealStderr(logging.StreamHandler):
    """Writes to stderr, the real one while `third_party_output` captures the block's output."""

    def __init__(self, level: int = logging.NOTSET, fmt: str = _FORMAT) -> None:
        logging.Handler.__init__(self, level)
        self.setFormatter(logging.Formatter(fmt, _DATEFMT))

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return _STATE.real_stderr or sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _Console(_RealStderr):
    """Third-party records on the console: all of them with verbose, else ERROR and above."""

    def emit(self, record: logging.LogRecord) -> None:
        if _STATE.verbose or record.levelno >= logging.ERROR:
            super().emit(record)


class _Routing:
    def __init__(self) -> None:
        self.installed = False
        self.verbose = False
        self.file = _RunFile()
        self.console = _Console()
        self.real_stderr: Any = None  # set while `third_party_output` captures
        self.showwarning: Any = None  # warnings.showwarning before ours


_STATE = _Routing()
# logging's last resort (posttrain's own warnings when nobody configured logging), kept on the
# real console while output is captured
_LAST_RESORT = _RealStderr(logging.WARNING, "%(message)s")


def _third_party_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    in_packages = "site-packages" in path or "dist-packages" in path
    return in_packages and not path.startswith(_POSTTRAIN_DIR)


def _showwarning(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """Warnings issued from third-party code go to the third-party log (console too if verbose)."""
    if file is None and _third_party_file(str(filename)):
        _STATE.file.write(warnings.formatwarning(message, category, filename, lineno, line))
        if not _STATE.verbose:
            return
    if file is None and _STATE.real_stderr is not None:
        file = _STATE.real_stderr
    (_STATE.showwarning or warnings._showwarning_orig)(  # type: ignore[attr-defined]
        message, category, filename, lineno, file, line
    )


def _install() -> None:
    if _STATE.installed:
        return
    _STATE.installed = True
    # vLLM puts a console handler on its logger at import, and again in `LLM(...)`, unless told
    # not to; its records then reach our handlers at its own level.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    vllm = logging.getLogger("vllm")
    if vllm.level == logging.NOTSET:
        try:
            vllm.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
        except ValueError:
            vllm.setLevel(logging.INFO)
    if _STATE.showwarning is None:
        _STATE.showwarning = warnings.showwarning
        warnings.showwarning = _showwarning


def adopt_third_party_loggers() -> None:
    """Route the third-party loggers that exist now: our file + console handlers on each top-level
    name, and no console handler of their own (libraries add theirs when imported: DeepSpeed,
    transformers, datasets, torch). No-op until `route_third_party` was called."""
    if not _STATE.installed:
        return
    ours = (_STATE.file, _STATE.console)
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in ours:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.propagate = False
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue
        if name.split(".", 1)[0] not in THIRD_PARTY_LOGGERS:
            continue
        console = [
            h
            for h in logger.handlers
            if isinstance(h, logging.StreamHandler)
            and not isinstance(h, logging.FileHandler)
            and h not in ours
        ]
        for handler in console:
            logger.removeHandler(handler)
        if console and "." in name:
            logger.propagate = True  # its records now reach the top-level logger's handlers


def _library_progress_bars(show: bool) -> None:
    """transformers' and huggingface_hub's own tqdm bars ("Loading weights", "Writing model
    shards"): hidden unless verbose (the env var covers libraries not imported yet)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0" if show else "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()


def route_third_party(output_dir: str | Path | None, *, verbose: bool = False) -> None:
    """Send third-party logs and warnings to ``<output_dir>/third_party.log`` from now on.

    Call it as early as possible (before vLLM is imported); with ``output_dir=None`` records are
    held until a later call names the directory. A directory inside the current one (a nested
    run: the SFT warm-up) keeps the current file. Idempotent; the process stays routed.

    Args:
        output_dir: the run directory (may not exist yet: lines are held until it does).
        verbose: also show third-party records and warnings on the console.
    """
    _install()
    _STATE.verbose = bool(verbose)
    _library_progress_bars(_STATE.verbose)
    if output_dir is not None:
        path = Path(output_dir).resolve() / third_party_log_name()
        current = _STATE.file.path
        if current is None or not path.parent.is_relative_to(current.parent):
            _STATE.file.set_path(path)
    adopt_third_party_loggers()


def _flush_c_stdio() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def third_party_output() -> Iterator[None]:
    """Send what the block prints (Python or C level: DeepSpeed's op builder, torch's C++
    warnings, vLLM's loading bar) to the third-party log, then re-route the loggers its imports
    created.

    Does not capture before `route_third_party`, with verbose, when nested, or when the
    standard file descriptors cannot be duplicated. If the block raises (other than a
    ConfigError), the captured text is also written to stderr before the exception propagates.
    """
    saved: tuple[int, int] | None = None
    if _STATE.installed and not _STATE.verbose and _STATE.real_stderr is None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        _flush_c_stdio()
        try:
            saved = (os.dup(1), os.dup(2))
        except OSError:
            saved = None
    if saved is None:
        try:
            yield
        finally:
            adopt_third_party_loggers()
        return
    failed, captured = False, ""
    try:
        with (
            tempfile.TemporaryFile() as tmp,
            open(tmp.fileno(), "w", encoding="utf-8", buffering=1, closefd=False) as text,
            open(saved[1], "w", encoding="utf-8", errors="replace", closefd=False) as real,
        ):
            old = (sys.stdout, sys.stderr, logging.lastResort)
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            sys.stdout = sys.stderr = text
            logging.lastResort = _LAST_RESORT
            _STATE.real_stderr = real
            try:
                yield
            except ConfigError:
                raise
            except Exception:
                failed = True
                raise
            finally:
                text.flush()
                _flush_c_stdio()
                sys.stdout, sys.stderr, logging.lastResort = old
                _STATE.real_stderr = None
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                tmp.seek(0)
                captured = tmp.read().decode("utf-8", "replace")
    finally:
        os.close(saved[0])
        os.close(saved[1])
        if captured:
            _STATE.file.write(captured if captured.endswith("\n") else captured + "\n")
            if failed:
                sys.stderr.write(captured)
                sys.stderr.flush()
        adopt_third_party_loggers()


@contextlib.contextmanager
def quiet_console(output_dir: str | Path, *, verbose: bool = False) -> Iterator[None]:
    """`route_third_party(output_dir, verbose=verbose)`, then `third_party_output()` around the
    block (a run's first, noisy setup call: DeepSpeed's init)."""
    route_third_party(output_dir, verbose=verbose)
    with third_party_output():
        yield
