"""The opt-in phase trace (posttrain/runtime/phase_trace.py) that the random-kill harness reads."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.reliability import open_phases, parse_trace, phase_stats
from posttrain.runtime import phase_trace


def test_spans_write_begin_and_end_lines_only_when_on(tmp_path, monkeypatch):
    trace = tmp_path / "trace"
    monkeypatch.delenv(phase_trace.TRACE_ENV, raising=False)
    with phase_trace.span("generate"):
        pass
    assert not trace.exists()  # off: nothing written
    monkeypatch.setenv(phase_trace.TRACE_ENV, str(trace))
    with phase_trace.span("generate"), phase_trace.span("reward"):
        pass
    with pytest.raises(ValueError), phase_trace.span("eval"):
        raise ValueError("an error still ends the span")
    with phase_trace.span(None):  # an untraced watchdog phase
        pass
    rows = parse_trace(trace)
    kinds = [(kind, phase) for _t, _pid, _tid, kind, phase in rows]
    assert kinds == [
        ("begin", "generate"),
        ("begin", "reward"),
        ("end", "reward"),
        ("end", "generate"),
        ("begin", "eval"),
        ("end", "eval"),
    ]
    times = [t for t, *_ in rows]
    assert times == sorted(times)
    assert open_phases(rows, rows[0][1]) == []  # all ended
    assert open_phases(rows[:2], rows[0][1]) == ["generate", "reward"]  # as if killed there
    assert {p: s["entries"] for p, s in phase_stats(rows).items()} == {
        "generate": 1,
        "reward": 1,
        "eval": 1,
    }


CHILD = """
from posttrain.runtime import phase_trace
for i in range(3):
    with phase_trace.span("backward"):
        pass
"""


@pytest.mark.slow
def test_hold_stops_the_process_on_the_nth_entry(tmp_path):
    trace = tmp_path / "trace"
    env = {phase_trace.TRACE_ENV: str(trace), phase_trace.HOLD_ENV: "backward@2"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", CHILD], env=env, cwd=root)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "T" or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the child ran past its hold"
        # stopped right after the begin line of the 2nd entry: 1 whole span, then 1 open
        rows = parse_trace(trace)
        assert [k for *_, k, _p in rows] == ["begin", "end", "begin"]
        assert open_phases(rows, proc.pid) == ["backward"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
