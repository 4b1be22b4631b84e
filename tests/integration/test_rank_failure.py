"""A rank that dies or hangs in a 2-rank torchrun run ends the run in bounded time, resumably.

The run is SFT on the tiny model (a gradient all-reduce and a token-count all-reduce every
step) with a checkpoint every 3 steps and many steps to go, so it is still training when the
test kills (SIGKILL) or freezes (SIGSTOP) one rank's real process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.runtime.checkpoint import STATE_FILE, latest
from posttrain.runtime.watchdog import EXIT_CODE
from tests.tiny_runs import SFT_SMALL, read_jsonl, torchrun

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "sft_tiny.yaml"
BOUND_S = 120  # the run must be over this long after the fault

SFT_RUN = ("train.steps=2000", "train.save_every=3", *SFT_SMALL)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train_cmd(out: Path, model: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "posttrain.cli",
        "train",
        str(RECIPE),
        f"model.path={model}",
        f"train.output_dir={out}",
        *SFT_RUN,
        *extra,
    ]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _rank_pids(agent: int) -> dict[int, int]:
    """{rank: pid} of the workers torchrun (pid `agent`) started, read from their environment."""
    ranks = {}
    for pid in _children(agent):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


class Run:
    """A 2-rank torchrun training run in the background, its output in a file."""

    def __init__(self, out: Path, model: Path, *extra: str) -> None:
        self.out = out
        self.log = out.parent / f"{out.name}.log"
        self.pids: dict[int, int] = {}
        with self.log.open("w") as fh:
            self.proc = subprocess.Popen(
                [*torchrun(2), *_train_cmd(out, model, *extra)],
                env=_env(),
                stdout=fh,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_checkpoint(self, timeout_s: float = 300) -> Path:
        """The first complete checkpoint, once there is one (and both ranks' pids)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"run ended early:\n{self.output()[-3000:]}"
            found = latest(self.out / "checkpoints")
            if found is not None:
                self.pids = _rank_pids(self.proc.pid)
                assert sorted(self.pids) == [0, 1], self.pids
                return found
            time.sleep(0.2)
        raise AssertionError(f"no checkpoint after {timeout_s} s:\n{self.output()[-3000:]}")

    def wait(self) -> tuple[int, float]:
        """(exit status, seconds) of torchrun from now; fails past BOUND_S."""
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {BOUND_S} s after the fault (a hang)") from None
        return rc, time.monotonic() - t0

    def fault_rank1(self, sig: int) -> tuple[int, float, str]:
        """Send `sig` to rank 1 after the first checkpoint: (torchrun's exit status, seconds
        from the fault to its end, the run's output); every process is killed afterwards."""
        try:
            self.wait_for_checkpoint()
            os.kill(self.pids[1], sig)
            rc, seconds = self.wait()
        finally:
            self.cleanup()
        return rc, seconds, self.output()

    def cleanup(self) -> None:
        for pid in [*self.pids.values(), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _assert_resumable(out: Path, model: Path, named: Path) -> None:
    """`named` is the newest complete checkpoint; one process continues it for 2 steps."""
    assert named == latest(out / "checkpoints")
    assert (named / STATE_FILE).is_file() and (named / "engine" / "state").is_dir()
    step = json.loads((named / STATE_FILE).read_text())["step"]
    rows_before = len(read_jsonl(out / "metrics.jsonl"))
    more = (f"train.resume={named}", f"train.steps={step + 2}")
    proc = subprocess.run(
        [sys.executable, *_train_cmd(out, model, *more)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    new_rows = read_jsonl(out / "metrics.jsonl")[rows_before:]
    assert [r["step"] for r in new_rows] == [step + 1, step + 2]
    assert json.loads((out / "checkpoints" / "final" / STATE_FILE).read_text())["step"] == step + 2


def test_killed_rank_ends_the_run(tmp_path, tiny_model_dir):
    run = Run(tmp_path / "run", tiny_model_dir)
    rc, seconds, text = run.fault_rank1(signal.SIGKILL)
    assert rc != 0, text[-3000:]
    assert seconds < BOUND_S
    assert f"Signal 9 (SIGKILL) received by PID {run.pids[1]}" in text, text[-3000:]  # torchrun
    # rank 0, when its collective notices the dead peer before torchrun stops it, says so too
    for line in text.splitlines():
        if line.startswith("[posttrain] rank 0 of 2 failed in phase '"):
            assert line.endswith(f"train.resume={latest(run.out / 'checkpoints')}")


def test_stopped_rank_ends_the_run_with_the_watchdog_and_resumes(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    run = Run(out, tiny_model_dir, "train.phase_timeout_s=10", "train.dist_timeout_s=600")
    rc, seconds, text = run.fault_rank1(signal.SIGSTOP)  # a stuck rank: alive, never answers
    assert rc != 0 and seconds < BOUND_S, text[-3000:]
    lines = [x for x in text.splitlines() if "[posttrain] watchdog: rank 0 of 2 stuck" in x]
    assert len(lines) == 1, text[-3000:]
    assert "limit train.phase_timeout_s=10)" in lines[0]
    assert f"exitcode  : {EXIT_CODE}" in text  # torchrun names rank 0's watchdog exit
    named = Path(lines[0].rsplit("train.resume=", 1)[1].strip())
    _assert_resumable(out, tiny_model_dir, named)


def test_stopped_rank_ends_the_run_with_the_collective_timeout(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    run = Run(out, tiny_model_dir, "train.phase_timeout_s=0", "train.dist_timeout_s=10")
    rc, seconds, text = run.fault_rank1(signal.SIGSTOP)  # a stuck rank: alive, never answers
    assert rc != 0 and seconds < BOUND_S, text[-3000:]
    lines = [x for x in text.splitlines() if "[posttrain] rank 0 of 2 failed in phase '" in x]
    assert len(lines) == 1, text[-3000:]
    assert "continue with train.resume=" in lines[0]


def test_checkpoint_stuck_mid_save_is_never_taken_for_complete(tmp_path, tiny_model_dir):
    """The watchdog ends a process stuck writing step 2's checkpoint after its state file was
    written; the half-saved directory keeps its `.tmp` name and the message names step 1."""
    out = tmp_path / "run"
    overrides = [
        f"model.path={tiny_model_dir}",
        f"train.output_dir={out}",
        *SFT_RUN,
        "train.steps=5",
        "train.save_every=1",
        "train.phase_timeout_s=5",
    ]
    code = f"""
import time
from posttrain.runtime import checkpoint
from posttrain.config import load_config
from posttrain.trainer import Trainer

real_fsync = checkpoint._fsync_tree

def stuck_on_step_2(path):  # fault: the filesystem stops answering while step 2 is saved
    if "step-000002" in str(path):
        time.sleep(600)
    real_fsync(path)

checkpoint._fsync_tree = stuck_on_step_2
Trainer(load_config({str(RECIPE)!r}, {overrides!r})).train()
"""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300
    )
    seconds = time.monotonic() - t0
    assert proc.returncode == EXIT_CODE, proc.stderr[-3000:]
    assert seconds < BOUND_S
    ckpts = out / "checkpoints"
    half = ckpts / "step-000002.tmp"
    assert (half / STATE_FILE).is_file() and not (ckpts / "step-000002").exists()
    assert latest(ckpts) == ckpts / "step-000001"
    last = proc.stderr.strip().splitlines()[-1]
    assert "watchdog: rank 0 of 1 stuck in phase 'checkpoint save' for " in last
    assert last.endswith(f"continue with train.resume={ckpts / 'step-000001'}")
