"""`posttrain.runtime.preemption`: the SIGTERM handler notes the signal, asks to stop at once and
to abandon the running step from half the grace period on, and is put back afterwards (one
process: the agreements are the local wishes). The real runs are in
tests/integration/test_preemption.py."""

from __future__ import annotations

import os
import signal
import time

from posttrain.runtime.preemption import ABANDON, STOP, Preemption


def test_signal_asks_to_stop_then_to_abandon_after_half_the_grace():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption(0.2) as p:
        assert p.active and signal.getsignal(signal.SIGTERM) != before
        assert p.local_request() == 0
        assert not p.stop_requested() and not p.abandon_requested()
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the process goes on
        assert p.signalled_at is not None
        first = p.signalled_at
        assert p.local_request() == STOP and p.stop_requested() and not p.abandon_requested()
        os.kill(os.getpid(), signal.SIGTERM)  # a second one changes nothing
        assert p.signalled_at == first
        time.sleep(0.11)
        assert p.local_request() == ABANDON and p.abandon_requested() and p.stop_requested()
    assert not p.active and signal.getsignal(signal.SIGTERM) == before


def test_zero_grace_installs_no_handler():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption(0) as p:
        assert not p.active and signal.getsignal(signal.SIGTERM) == before
        assert not p.stop_requested() and not p.abandon_requested()


def test_message_names_the_checkpoint_and_how_to_continue():
    p = Preemption(60)
    assert p.message(3, "runs/x/checkpoints/preempted-step-000003", abandoned=False) == (
        "[posttrain] preempted (SIGTERM): stopped after step 3; resumable checkpoint: "
        "runs/x/checkpoints/preempted-step-000003 (continue with "
        "train.resume=runs/x/checkpoints/preempted-step-000003)"
    )
    text = p.message(3, "c", abandoned=True, hint="the same command continues it")
    assert text == (
        "[posttrain] preempted (SIGTERM): step 4 abandoned (still running at half of "
        "train.preempt_grace_s=60); stopped after step 3; resumable checkpoint: c "
        "(the same command continues it)"
    )
