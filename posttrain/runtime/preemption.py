"""Preemption: SIGTERM ends a run with a checkpoint and exit status 0 within a grace period.

Slurm and Kubernetes send SIGTERM and, a grace period later (Slurm's KillWait, a pod's
terminationGracePeriodSeconds), SIGKILL. While `Trainer.train` runs, `Preemption` handles
SIGTERM (`train.preempt_grace_s`, default 60 s; 0 leaves SIGTERM's default action, ending the
process at once):

- The handler only notes when the signal came. A Python handler runs in the main thread between
  two bytecodes, possibly inside DeepSpeed's bookkeeping or a collective's caller: it does no
  more than that.
- At every step boundary the ranks all-reduce "a signal came" (MAX). If any rank got one, every
  rank saves the same step's checkpoint together, `Trainer.train` returns and the process ends
  with status 0; rank 0 prints one line naming the checkpoint and the `train.resume=` that
  continues it. A rank signalled alone (or first) never leaves the others waiting: they learn of
  it at the same collective.
- A step still running at half the grace period after the signal is abandoned, so the other
  half is left for the checkpoint write. It is abandoned only at a safe point: where every rank
  is at the same place of the same step, before the step's first optimizer update (after the
  batch is made, before each micro-batch of the first update, before that update's
  `engine.step()`). There the ranks all-reduce "past the deadline", so they abandon together.
  The engine then still holds the last completed step's weights, optimizer state and LR
  schedule, and the trainer saves them with the trainer state and RNG it noted when the step
  began (`checkpoint.Snapshot`): the checkpoint is the one a stop at the previous boundary would
  have written, and a run resumed from it equals a straight run.
- Why a phase is never cut short from the handler or a timer thread: a rank that leaves a
  phase in the middle leaves its peers blocked in a collective (a gradient reduction, a
  rollout all-gather), and DeepSpeed or vLLM state interrupted at an arbitrary bytecode cannot
  be trusted for a checkpoint. So one phase longer than the grace period (a long generation, a
  long eval) runs on until its end, and SIGKILL may come first: size the grace for it.
- Not abandoned: a step past its first optimizer update (the weights changed), and every step
  with async prefetch (`rollout.max_staleness >= 1`, where noting the start state would wait
  for the queued generations at every step). They finish, and the run stops at the boundary.

Under torchrun, torchrun forwards a SIGTERM it gets to every worker and SIGKILLs them after its
own `--shutdown-timeout` (default 30 s): give it at least `train.preempt_grace_s`.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

from posttrain.runtime import distributed as dist

GRACE_KEY = "train.preempt_grace_s"
STOP, ABANDON = 1, 2  # what a rank asks for at an agreement: stop at the boundary / abandon now


class Preemption:
    """SIGTERM handling for one `Trainer.train` call (use it as a context manager).

    Args:
        grace_s: seconds between SIGTERM and the SIGKILL that follows it; a step still running
            at half of it is abandoned at its next safe point. 0 or less = no handler.
        signum: the signal handled.
    """

    def __init__(self, grace_s: float, signum: int = signal.SIGTERM) -> None:
        self.grace_s = float(grace_s)
        self.signum = signum
        self.signalled_at: float | None = None  # time.monotonic() of the first signal
        self._previous: object = None
        self._installed = False

    @property
    def active(self) -> bool:
        """True while the handler is installed (every rank decides alike: config + main thread)."""
        return self._installed

    def __enter__(self) -> Preemption:
        if self.grace_s > 0 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._on_signal)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(self.signum, previous)  # type: ignore[arg-type]
            self._installed = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()

    def local_request(self) -> int:
        """This rank's wish: 0, `STOP` (signalled) or `ABANDON` (signalled >= grace/2 ago)."""
        if self.signalled_at is None:
            return 0
        late = time.monotonic() - self.signalled_at >= self.grace_s / 2
        return ABANDON if late else STOP

    def _agreed(self) -> int:
        return int(dist.all_reduce_max_list([float(self.local_request())])[0])

    def stop_requested(self) -> bool:
        """At a step boundary (a collective on every rank): True when any rank got the signal."""
        return self.active and self._agreed() >= STOP

    def abandon_requested(self) -> bool:
        """At a safe point inside a step (a collective on every rank): True when any rank's
        signal is half the grace period old."""
        return self.active and self._agreed() >= ABANDON

    def message(self, step: int, path: object, abandoned: bool, hint: str | None = None) -> str:
        """The line a preempted run ends with (stdout, rank 0); `hint` replaces
        `continue with train.resume=<path>`."""
        name = signal.Signals(self.signum).name
        cut = (
            f"step {step + 1} abandoned (still running at half of {GRACE_KEY}={self.grace_s:g}); "
            if abandoned
            else ""
        )
        return (
            f"[posttrain] preempted ({name}): {cut}stopped after step {step}; resumable "
            f"checkpoint: {path} ({hint or f'continue with train.resume={path}'})"
        )
