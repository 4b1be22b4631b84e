"""Per-phase watchdog: a stuck or failed rank ends the run with a clear message, never a hang.

The training loop marks its phases (`generate`, `train`, `weight sync`, `checkpoint save`,
`eval`, `resume`) with `Watchdog.phase(name)`. A daemon thread checks the phase that is running;
when it has run longer than `train.phase_timeout_s`, the thread prints every thread's stack and
one message naming the rank, the phase, the limit and the newest complete checkpoint (with the
`train.resume=...` to continue from), then ends the process with `os._exit` (a thread stuck in a
collective or in a hung weight sync cannot be interrupted). `torchrun` then tears the other
ranks down. A phase that raises (e.g. a collective that hit `train.dist_timeout_s`, or a peer
that died) prints the same message before the error propagates.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from posttrain.errors import ConfigError, NumericalError, RolloutError, StorageError
from posttrain.runtime import phase_trace

EXIT_CODE = 124  # like coreutils `timeout`
LIMIT_KEY = "train.phase_timeout_s"
# errors the trainer reports itself (RolloutError, NumericalError: with their own checkpoint)
_REPORTED_ELSEWHERE = (
    RolloutError,
    NumericalError,
    ConfigError,
    StorageError,
    KeyboardInterrupt,
    SystemExit,
)


def resume_hint(checkpoints: Path) -> str:
    """Where to continue from: the newest complete checkpoint under `checkpoints`, as a sentence."""
    from posttrain.runtime import checkpoint  # torch: imported by then in a training process

    try:
        found = checkpoint.latest(checkpoints)
    except (OSError, ValueError, KeyError):  # a directory changing under us
        found = None
    if found is None:
        return (
            f"no complete checkpoint under {checkpoints} yet (train.save_every=N saves one "
            "every N steps); rerun from the start"
        )
    return f"last complete checkpoint: {found}; continue with train.resume={found}"


class Watchdog:
    """Ends this process when a named phase runs past `limit_s`.

    Args:
        limit_s: seconds one phase may run; 0 or less = no limit (phases are still named in the
            message of a phase that raises).
        checkpoints: the run's checkpoint directory (searched when the message is written).
        rank: this process's rank, for the message.
        world_size: number of ranks, for the message.
        exit_code: the status the process ends with when a phase runs too long.
        poll_s: how often the thread looks (default: a twentieth of the limit, at most 1 s).
    """

    def __init__(
        self,
        limit_s: float,
        *,
        checkpoints: Path,
        rank: int = 0,
        world_size: int = 1,
        exit_code: int = EXIT_CODE,
        poll_s: float | None = None,
    ) -> None:
        self.limit_s = float(limit_s)
        self.checkpoints = Path(checkpoints)
        self.rank = rank
        self.world_size = world_size
        self.exit_code = exit_code
        self.poll_s = poll_s if poll_s is not None else min(1.0, max(self.limit_s / 20, 0.01))
        self._current: tuple[str, float] | None = None  # (phase, monotonic start); set atomically
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: BaseException | None = None  # so nested phases report an error once

    @property
    def enabled(self) -> bool:
        """True when phases have a time limit."""
        return self.limit_s > 0

    def start(self) -> Watchdog:
        """Start the watching thread (a no-op when disabled or already started)."""
        if self.enabled and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="posttrain-watchdog")
            self._thread.daemon = True
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the watching thread (phases run afterwards are not timed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block as phase `name`.

        A nested phase is timed on its own; when it ends, the enclosing phase's clock restarts
        (so an outer phase such as `step` limits the time between its inner phases).
        """
        outer = self._current
        start = time.monotonic()
        self._current = (name, start)
        traced = phase_trace.WATCHDOG_PHASES.get(name)  # POSTTRAIN_PHASE_TRACE (opt-in)
        try:
            with phase_trace.span(traced):
                yield
        except _REPORTED_ELSEWHERE:
            raise
        except BaseException as err:
            if err is not self._reported:  # report once, in the innermost phase
                self._reported = err
                first = str(err).strip().splitlines()
                detail = f"{type(err).__name__}: {first[0] if first else ''}"
                self._print(
                    f"{self._who()} failed in phase '{name}' after "
                    f"{time.monotonic() - start:.1f} s ({detail}). {resume_hint(self.checkpoints)}"
                )
            raise
        finally:
            self._current = None if outer is None else (outer[0], time.monotonic())

    def _who(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    def _print(self, message: str) -> None:
        print(f"[posttrain] {message}", file=sys.stderr, flush=True)

    def message(self, name: str, elapsed: float) -> str:
        """The text printed when phase `name` has run `elapsed` seconds, past the limit."""
        cause = (
            "a peer rank may have died or stopped, or a collective or weight sync hung"
            if self.world_size > 1
            else "the phase hung (e.g. a weight sync or a generation that never returns)"
        )
        return (
            f"watchdog: {self._who()} stuck in phase '{name}' for {elapsed:.1f} s "
            f"(limit {LIMIT_KEY}={self.limit_s:g}); {cause}. Ending this process with exit "
            f"status {self.exit_code}. {resume_hint(self.checkpoints)}"
        )

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            current = self._current
            if current is None:
                continue
            name, start = current
            elapsed = time.monotonic() - start
            if elapsed > self.limit_s and self._current is current:
                self._fire(name, elapsed)

    def _fire(self, name: str, elapsed: float) -> None:
        """Print the stacks and the message, then end the process (never returns)."""
        try:
            try:
                print(f"[posttrain] watchdog: stacks of rank {self.rank}:", file=sys.stderr)
                sys.stderr.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            except (OSError, ValueError, AttributeError):  # stderr without a file descriptor
                pass
            sys.stdout.flush()
            self._print(self.message(name, elapsed))
        finally:
            os._exit(self.exit_code)
