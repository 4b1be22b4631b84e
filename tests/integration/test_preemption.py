"""Preemption: SIGTERM (what Slurm and Kubernetes send before SIGKILL) ends a real `posttrain
train` process with a checkpoint of the last completed step, exit status 0 and the
`train.resume=` line; `train.resume=auto` then finishes the run with the final weights of a
straight run, bitwise (CPU). A step still running at half of `train.preempt_grace_s` is
abandoned and the checkpoint is the previous step's. Under torchrun both ranks stop at the same
step, whether one rank or every process gets the signal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.runtime.checkpoint import STATE_FILE
from posttrain.trainer import Trainer
from tests.tiny_runs import SFT_SMALL, TINY_RUN, read_jsonl, tiny_cfg, torchrun

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 30  # GRPO steps on the tiny model take ~0.1-0.2 s: the signal lands mid-run
GRPO = (*TINY_RUN, "rollout.engine=hf", f"train.steps={STEPS}", "train.save_every=0")
SAME = ("loss", "grad_norm", "reward/mean", "entropy", "lr")  # per-step metrics to match
LINE = re.compile(
    r"^\[posttrain\] preempted \(SIGTERM\): (step \d+ abandoned .*; )?stopped after step "
    r"(\d+); resumable checkpoint: (\S+) \(continue with train.resume=(\S+)\)$",
    re.M,
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "grpo.yaml"
    path.write_text("train:\n  algorithm: grpo\n")
    return path


def _train(launcher: list[str], recipe: Path, out: Path, *extra: str) -> list[str]:
    cli = [*launcher, "-m", "posttrain.cli", "train", str(recipe)]
    return [*cli, f"train.output_dir={out}", *extra]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _assert_bitwise(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ from a straight run"


def _assert_same_rows(want: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got, strict=True):
        for key in SAME:
            if key in a:
                assert b[key] == a[key], (a["step"], key)


class Background:
    """A training command in the background, its output in files, signalled mid-run."""

    def __init__(self, cmd: list[str], out: Path, logs: Path | None = None) -> None:
        self.out = out  # the run directory whose metrics.jsonl is watched
        logs = logs or out.parent
        self.stdout = logs / f"{out.name}.out"
        self.stderr = logs / f"{out.name}.err"
        with self.stdout.open("w") as o, self.stderr.open("w") as e:
            self.proc = subprocess.Popen(
                cmd, env=_env(), stdout=o, stderr=e, start_new_session=True
            )

    def wait_for_step(self, step: int, timeout_s: float = 300) -> None:
        """Until metrics.jsonl has `step` rows (fails if the process ends first)."""
        metrics = self.out / "metrics.jsonl"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ended early:\n{self.stderr.read_text()[-3000:]}"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
                return
            time.sleep(0.02)
        raise AssertionError(f"no step {step} after {timeout_s} s")

    def wait(self, timeout_s: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"still running {timeout_s} s after SIGTERM") from None


def _stopped(stdout: str, out: Path) -> tuple[int, Path]:
    """(the step the preempted run stopped after, its checkpoint) from the one line it printed."""
    lines = LINE.findall(stdout)
    assert len(lines) == 1, stdout[-3000:]
    _, step, path, resume = lines[0]
    assert path == resume
    ckpt = Path(path)
    assert ckpt.parent == out / "checkpoints" and (ckpt / "engine" / "state").is_dir()
    assert json.loads((ckpt / STATE_FILE).read_text())["step"] == int(step)
    return int(step), ckpt


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir) -> Path:
    """The uninterrupted STEPS-step run through the command line (its output dir)."""
    tmp = tmp_path_factory.mktemp("straight")
    out = tmp / "run"
    cmd = _train([sys.executable], _recipe(tmp), out, f"model.path={tiny_model_dir}", *GRPO)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sigterm_checkpoints_exits_0_and_resumes_like_a_straight_run(
    tmp_path, tiny_model_dir, straight
):
    out = tmp_path / "run"
    cmd = _train([sys.executable], _recipe(tmp_path), out, f"model.path={tiny_model_dir}", *GRPO)
    run = Background(cmd, out)
    run.wait_for_step(1)
    run.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert run.wait() == 0, run.stderr.read_text()[-3000:]
    assert time.monotonic() - t0 < 60  # within the default grace period
    step, ckpt = _stopped(run.stdout.read_text(), out)
    assert 1 <= step < STEPS and ckpt.name == f"preempted-step-{step:06d}"
    assert "Traceback" not in run.stderr.read_text()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, step + 1))
    assert not (out / "checkpoints" / "final").exists()

    resumed = subprocess.run(
        [*cmd, "train.resume=auto"], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_rows(read_jsonl(straight / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl"))
    _assert_bitwise(straight / "checkpoints" / "final", out / "checkpoints" / "final")


def test_step_still_running_at_half_the_grace_is_abandoned(tmp_path, tiny_model_dir, capsys):
    """SIGTERM during step 2's first micro-batch, which then runs past half the grace period
    (0.1 of 0.2 s): step 2 is abandoned at the next micro-batch, the checkpoint holds step 1
    (weights, data position, RNG), and the run resumed from it equals a straight run."""
    extra = ("rollout.engine=hf", "train.steps=4", "train.preempt_grace_s=0.2")
    straight_out = tmp_path / "straight"
    Trainer(tiny_cfg(straight_out, tiny_model_dir, *extra)).train()

    out = tmp_path / "run"
    trainer = Trainer(tiny_cfg(out, tiny_model_dir, *extra))
    real = trainer.algorithm.loss

    def loss(outputs, mb, batch):
        if trainer.step == 1 and trainer.preemption.signalled_at is None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.15)
        return real(outputs, mb, batch)

    trainer.algorithm.loss = loss
    handler = signal.getsignal(signal.SIGTERM)
    assert len(trainer.train()) == 1
    assert signal.getsignal(signal.SIGTERM) is handler  # put back after train()
    text = capsys.readouterr().out
    step, ckpt = _stopped(text, out)
    assert step == 1 and ckpt.name == "preempted-step-000001" and trainer.preempted == ckpt
    assert "step 2 abandoned (still running at half of train.preempt_grace_s=0.2); " in text
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["step"] == 1 and state["algorithm"]["stream"]["pools"][0]["pos"] == 4

    Trainer(tiny_cfg(out, tiny_model_dir, *extra, "train.resume=auto")).train()
    _assert_same_rows(read_jsonl(straight_out / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl"))
    _assert_bitwise(straight_out / "checkpoints" / "final", out / "checkpoints" / "final")


# ------------------------------------------------------------------ two ranks (torchrun)

SFT_RECIPE = ROOT / "recipes" / "sft_tiny.yaml"
SFT = ("train.steps=40", "train.save_every=0", *SFT_SMALL)


def _rank_pids(agent: int) -> dict[int, int]:
    """{rank: pid} of the workers torchrun (pid `agent`) started, read from their environment."""
    ranks = {}
    for task in Path(f"/proc/{agent}/task").iterdir():
        for pid in (int(c) for c in (task / "children").read_text().split()):
            for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if item.startswith(b"RANK="):
                    ranks[int(item[5:])] = pid
    return ranks


@pytest.fixture(scope="module")
def straight_2_ranks(tmp_path_factory, tiny_model_dir) -> Path:
    """The uninterrupted 2-rank SFT run (its output dir)."""
    out = tmp_path_factory.mktemp("straight2") / "run"
    cmd = _train(torchrun(2), SFT_RECIPE, out, f"model.path={tiny_model_dir}", *SFT)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("target", ["rank 1", "every process"])
def test_sigterm_under_torchrun_stops_both_ranks_together(
    tmp_path, tiny_model_dir, straight_2_ranks, target
):
    """SIGTERM to rank 1 alone (rank 0 learns of it at the next step boundary), or to every
    process of the job as Slurm's scancel does (torchrun forwards its own copy to the workers):
    both ranks save the same step's checkpoint and end with status 0, rank 0 prints the line.
    torchrun itself exits 0 in the first case; signalled itself, it re-raises the signal and
    exits 1. The 2-rank run resumed from the checkpoint equals the straight one."""
    out = tmp_path / "run"
    cmd = _train(torchrun(2), SFT_RECIPE, out, f"model.path={tiny_model_dir}", *SFT)
    run = Background(cmd, out)
    run.wait_for_step(1)
    ranks = _rank_pids(run.proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    if target == "rank 1":
        os.kill(ranks[1], signal.SIGTERM)
    else:
        os.killpg(run.proc.pid, signal.SIGTERM)  # torchrun and its workers
    rc = run.wait()
    log = run.stdout.read_text() + run.stderr.read_text()
    assert rc == (0 if target == "rank 1" else 1), log[-3000:]
    assert "exitcode" not in log  # torchrun names a worker that failed; none did
    step, ckpt = _stopped(run.stdout.read_text(), out)
    assert 1 <= step < 40
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, step + 1))

    resumed = subprocess.run(
        [*cmd, "train.resume=auto"], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = read_jsonl(straight_2_ranks / "metrics.jsonl")
    _assert_same_rows(want, read_jsonl(out / "metrics.jsonl"))
    _assert_bitwise(straight_2_ranks / "checkpoints" / "final", out / "checkpoints" / "final")


def test_sigterm_during_the_sft_warmup(tmp_path, tiny_model_dir):
    """SIGTERM while `warmup.steps` of SFT run (inside Trainer()): the warm-up saves its own
    checkpoint, the process exits 0 with a line saying the same command continues it, and it
    does (warm-up steps 1..W once each, then the GRPO run)."""
    out = tmp_path / "run"
    extra = ("warmup.steps=8", "warmup.batch_size=8", "train.steps=2")
    cmd = _train([sys.executable], _recipe(tmp_path), out, f"model.path={tiny_model_dir}", *GRPO)
    cmd += extra
    warm = out / "sft-warmup"
    run = Background(cmd, warm, logs=tmp_path)
    run.wait_for_step(1)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 0, run.stderr.read_text()[-3000:]
    text = run.stdout.read_text()
    assert "(the same command continues the warm-up from it)" in text, text[-2000:]
    assert f"resumable checkpoint: {warm / 'checkpoints' / 'preempted-step-'}" in text
    assert not (out / "metrics.jsonl").exists()

    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(warm / "metrics.jsonl")] == list(range(1, 9))
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
