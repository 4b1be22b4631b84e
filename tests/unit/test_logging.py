"""posttrain.runtime.logging: metrics.jsonl, wandb offline/disabled, ranks, progress, PNG curves,
the quiet console (third-party logs to the run's third_party.log)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

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


# ----------------------------------------------------------------------------- quiet console
@pytest.fixture
def routing(monkeypatch):
    """posttrain.runtime.logging with a fresh, unrouted quiet-console state; every logger, the
    warnings hook and VLLM_CONFIGURE_LOGGING are restored after the test."""
    import posttrain.runtime.logging as rl

    monkeypatch.setattr(rl, "_STATE", rl._Routing())
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setenv("VLLM_CONFIGURE_LOGGING", "1")  # records the original value ...
    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING")  # ... and unset, so routing sets it
    loggers = logging.root.manager.loggerDict
    saved = {
        name: (lg.handlers[:], lg.propagate, lg.level)
        for name, lg in loggers.items()
        if isinstance(lg, logging.Logger)
    }
    yield rl
    rl._STATE.file.close()
    for name, lg in list(loggers.items()):
        if isinstance(lg, logging.Logger):
            handlers, propagate, level = saved.get(name, ([], True, logging.NOTSET))
            lg.handlers[:] = handlers
            lg.propagate = propagate
            lg.setLevel(level)


def test_third_party_logs_wait_for_the_run_dir_then_go_to_its_file(routing, tmp_path, capsys):
    run = tmp_path / "run"
    routing.route_third_party(run)
    assert os.environ["VLLM_CONFIGURE_LOGGING"] == "0"  # vLLM adds no console handler
    logging.getLogger("vllm.model_executor").info("Reloading weights inplace...")
    logging.getLogger("DeepSpeed").warning("a DeepSpeed notice")
    assert not run.exists()  # held in memory: a run that stops early leaves nothing behind
    run.mkdir()
    logging.getLogger("transformers.generation").warning("a transformers warning")
    logging.getLogger("posttrain").warning("our own warning")
    text = (run / "third_party.log").read_text()
    for line in ("Reloading weights inplace...", "a DeepSpeed notice", "a transformers warning"):
        assert line in text
    assert "INFO" in text and "[test_logging.py:" in text  # vLLM's format: level, file:line
    assert "our own warning" not in text  # posttrain's logger is not routed
    assert "Reloading" not in capsys.readouterr().err
    logging.getLogger("vllm").error("EngineCore died")  # errors are never hidden
    assert "EngineCore died" in capsys.readouterr().err


def test_verbose_shows_third_party_records_too(routing, tmp_path, capsys):
    routing.route_third_party(tmp_path, verbose=True)
    logging.getLogger("vllm").info("Successfully reset prefix cache")
    err = capsys.readouterr().err
    assert "INFO" in err and "Successfully reset prefix cache" in err
    assert "Successfully reset prefix cache" in (tmp_path / "third_party.log").read_text()
    routing.route_third_party(tmp_path, verbose=False)
    logging.getLogger("vllm").info("quiet again")
    assert "quiet again" not in capsys.readouterr().err


def test_rank_files_and_nested_runs(routing, tmp_path, monkeypatch):
    assert routing.third_party_log_name(0) == "third_party.log"
    assert routing.third_party_log_name(3) == "third_party.rank3.log"
    monkeypatch.setenv("RANK", "2")
    routing.route_third_party(tmp_path / "a")
    assert routing._STATE.file.path == (tmp_path / "a" / "third_party.rank2.log").resolve()
    routing.route_third_party(tmp_path / "a" / "sft-warmup")  # the warm-up writes to its parent's
    assert routing._STATE.file.path.parent == (tmp_path / "a").resolve()
    routing.route_third_party(tmp_path / "b")  # a later, separate run gets its own file
    assert routing._STATE.file.path.parent == (tmp_path / "b").resolve()


def test_library_console_handlers_are_replaced(routing):
    lib = logging.getLogger("datasets")
    lib_console = logging.StreamHandler(sys.stderr)
    lib.addHandler(lib_console)
    child = logging.getLogger("torch.fake_child")
    child_console = logging.StreamHandler(sys.stderr)
    child.addHandler(child_console)
    child.propagate = False
    app = logging.getLogger("someapp")
    app_console = logging.StreamHandler(sys.stderr)
    app.addHandler(app_console)
    routing.route_third_party(None)
    assert lib_console not in lib.handlers and routing._STATE.file in lib.handlers
    assert not lib.propagate
    assert child_console not in child.handlers and child.propagate  # reaches "torch"'s handlers
    assert app.handlers == [app_console]  # not a third-party library: untouched
    app.removeHandler(app_console)


def test_warnings_of_third_party_code_go_to_the_file(routing, tmp_path):
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        routing.route_third_party(tmp_path)
        routing._STATE.showwarning = lambda message, *rest: shown.append(str(message))
        lib = "/venv/lib/python3.11/site-packages/vllm/triton_utils/dispatcher.py"
        warnings.warn_explicit("reduce_op is deprecated", FutureWarning, lib, 138)
        ours = str(Path(routing.__file__).parent.parent / "trainer.py")
        warnings.warn_explicit("our own warning", UserWarning, ours, 1)
    assert shown == ["our own warning"]
    assert "FutureWarning: reduce_op is deprecated" in (tmp_path / "third_party.log").read_text()


CAPTURE_SCRIPT = """
import ctypes, logging, os, sys
from posttrain.errors import ConfigError
from posttrain.runtime.logging import route_third_party, third_party_output

run = sys.argv[1]
with third_party_output():  # not routed yet: nothing is captured
    print("before routing")
route_third_party(run)
with third_party_output():
    print("python stdout noise")
    print("python stderr noise", file=sys.stderr)
    os.write(1, b"C stdout noise\\n")
    os.write(2, b"C stderr noise\\n")
    ctypes.CDLL(None).printf(b"libc buffered noise\\n")
    logging.getLogger("posttrain").warning("posttrain warning inside")
    logging.getLogger("vllm").error("vllm error inside")
print("after the block", flush=True)
os.makedirs(run)
try:
    with third_party_output():
        print("noise before a crash")
        raise RuntimeError("boom")
except RuntimeError:
    pass
try:
    with third_party_output():
        print("noise before a config error")
        raise ConfigError("bad value")
except ConfigError:
    pass
"""


def test_captured_output_goes_to_the_file_and_is_replayed_on_a_crash(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CAPTURE_SCRIPT), str(run)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "before routing\nafter the block\n"
    # never hidden: posttrain's own warnings, third-party errors, what a crashing call printed
    for line in ("posttrain warning inside", "vllm error inside", "noise before a crash"):
        assert line in proc.stderr
    for line in ("python stderr", "C stderr", "libc", "noise before a config error"):
        assert line not in proc.stderr, proc.stderr
    text = (run / "third_party.log").read_text()
    for line in (
        "python stdout noise",
        "python stderr noise",
        "C stdout noise",
        "C stderr noise",
        "libc buffered noise",
        "vllm error inside",
        "noise before a crash",
        "noise before a config error",
    ):
        assert line in text
    assert "posttrain warning inside" not in text


def test_library_progress_bars_follow_verbose(tmp_path):
    """transformers' own tqdm bars (loading / writing weights) are hidden unless log.verbose."""
    code = (
        "import sys\n"
        "from posttrain.runtime.logging import route_third_party\n"
        f"route_third_party({str(tmp_path)!r}, verbose=sys.argv[1] == '1')\n"
        "from posttrain.models import make_tiny\n"
        f"make_tiny({str(tmp_path / 'tiny')!r})\n"
    )
    runs = {
        v: subprocess.run(
            [sys.executable, "-c", code, v], capture_output=True, text=True, timeout=300
        )
        for v in ("0", "1")
    }
    assert all(r.returncode == 0 for r in runs.values()), runs["0"].stderr[-2000:]
    assert "Writing model shards" not in runs["0"].stderr
    assert "Writing model shards" in runs["1"].stderr
