"""Opt-in phase trace: where a training process is, for the reliability harness.

`POSTTRAIN_PHASE_TRACE=<file>` makes every traced phase append two lines to `<file>`,

    <time.monotonic()> <pid> <thread id> begin <phase>
    <time.monotonic()> <pid> <thread id> end <phase>

each written with one `write` on an `O_APPEND` descriptor (whole lines, even from several
threads or processes). `benchmarks/reliability.py` reads it to kill a run inside a chosen phase
and to name the phases a kill hit (those begun and not ended). Unset, a span costs one
`os.environ` lookup.

`POSTTRAIN_PHASE_HOLD=<phase>@<n>` (with the trace on) stops the process (`SIGSTOP`) right after
the begin line of the n-th (1-based) entry to `<phase>`: the harness then kills it there, or
continues it (`SIGCONT`) and kills it a random moment later.

The phases (`PHASES`): model load, generate, reward, logprob, backward, optimizer step, weight
sync, checkpoint write, eval, async prefetch, plus resume (loading a checkpoint).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

TRACE_ENV = "POSTTRAIN_PHASE_TRACE"
HOLD_ENV = "POSTTRAIN_PHASE_HOLD"
PHASES = (
    "model load",
    "generate",
    "reward",
    "logprob",
    "backward",
    "optimizer step",
    "weight sync",
    "checkpoint write",
    "eval",
    "async prefetch",
    "resume",
)
# watchdog phase names (runtime/watchdog.py) traced under a phase of their own
WATCHDOG_PHASES = {"checkpoint save": "checkpoint write", "eval": "eval", "resume": "resume"}

_entries: dict[str, int] = {}  # entries per phase in this process (for the hold)
_lock = threading.Lock()


def _write(kind: str, phase: str, path: str) -> None:
    line = f"{time.monotonic():.6f} {os.getpid()} {threading.get_ident()} {kind} {phase}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _hold(phase: str) -> None:
    """Stop this process on the entry `POSTTRAIN_PHASE_HOLD` names."""
    spec = os.environ.get(HOLD_ENV, "")
    name, _, nth = spec.rpartition("@")
    with _lock:
        _entries[phase] = count = _entries.get(phase, 0) + 1
    if name == phase and nth.isdigit() and count == int(nth):
        os.kill(os.getpid(), signal.SIGSTOP)


def begin(phase: str) -> None:
    """Note that `phase` begins in this thread (a no-op unless the trace is on)."""
    path = os.environ.get(TRACE_ENV)
    if path:
        _write("begin", phase, path)
        _hold(phase)


def end(phase: str) -> None:
    """Note that `phase` ended in this thread (a no-op unless the trace is on)."""
    path = os.environ.get(TRACE_ENV)
    if path:
        _write("end", phase, path)


@contextmanager
def span(phase: str | None) -> Iterator[None]:
    """Trace the enclosed block as `phase` (None: not traced)."""
    if phase is None or not os.environ.get(TRACE_ENV):
        yield
        return
    begin(phase)
    try:
        yield
    finally:
        end(phase)
