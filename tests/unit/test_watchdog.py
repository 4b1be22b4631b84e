"""The per-phase watchdog: fires past the limit with one clear message, never before.

A firing watchdog ends its process with `os._exit`, so those cases run in a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError, RolloutError
from posttrain.runtime.watchdog import EXIT_CODE, Watchdog, resume_hint

REPO = Path(__file__).resolve().parents[2]


def _checkpoint(root: Path, name: str, step: int) -> Path:
    """A directory `checkpoint.latest` counts as complete (it holds trainer_state.json)."""
    path = root / name
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def _child(body: str, ckpts: Path, limit: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run `body` in a fresh interpreter with a started Watchdog `wd`; (result, seconds)."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from posttrain.runtime.watchdog import Watchdog
        wd = Watchdog({limit}, checkpoints=Path({str(ckpts)!r}), rank=1, world_size=2).start()
        """
    ) + textwrap.dedent(body)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    return proc, time.monotonic() - t0


def test_fires_past_the_limit_with_rank_phase_limit_and_newest_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _checkpoint(ckpts, "step-000002", 2)
    newest = _checkpoint(ckpts, "step-000004", 4)
    _checkpoint(ckpts, "step-000006.tmp", 6)  # being written when the process died: not complete
    body = """
        with wd.phase("weight sync"):
            time.sleep(30)
        print("not reached")
    """
    proc, seconds = _child(body, ckpts, limit=0.5)
    assert proc.returncode == EXIT_CODE
    assert seconds < 15  # interpreter start + 0.5 s limit, far below the 30 s sleep
    assert "not reached" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("[posttrain] watchdog: rank 1 of 2 stuck in phase 'weight sync' for ")
    assert "train.phase_timeout_s=0.5" in last
    assert f"last complete checkpoint: {newest}; continue with train.resume={newest}" in last
    assert "time.sleep" in proc.stderr or 'File "<string>"' in proc.stderr  # the stuck stack


def test_does_not_fire_when_each_phase_ends_in_time(tmp_path):
    # five phases of 0.4 s (2 s in all) under a 1 s limit, and untimed work between them
    body = """
        for i in range(5):
            with wd.phase(f"train {i}"):
                time.sleep(0.4)
        time.sleep(1.5)  # outside any phase: not timed
        with wd.phase("step"):  # a nested phase restarts the enclosing one's clock
            for i in range(4):
                with wd.phase("generate"):
                    time.sleep(0.4)
        wd.stop()
        print("done")
    """
    proc, _ = _child(body, tmp_path / "checkpoints", limit=1.0)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert "watchdog" not in proc.stderr


def test_outer_phase_fires_when_stuck_between_inner_phases(tmp_path):
    body = """
        with wd.phase("step"):
            with wd.phase("train"):
                time.sleep(0.2)
            time.sleep(30)  # e.g. a metric all-reduce with a dead peer
    """
    proc, seconds = _child(body, tmp_path / "checkpoints", limit=0.6)
    assert proc.returncode == EXIT_CODE
    assert seconds < 15
    assert "stuck in phase 'step'" in proc.stderr
    assert "no complete checkpoint under" in proc.stderr  # and says so, rather than a path


def test_a_failing_phase_names_itself_once_and_reraises(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, "step-000003", 3)
    wd = Watchdog(0, checkpoints=tmp_path, rank=0, world_size=2)
    with (
        pytest.raises(RuntimeError, match="Connection closed by peer"),
        wd.phase("step"),
        wd.phase("train"),
    ):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1234\nmore detail")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("[posttrain] rank 0 of 2 failed in phase 'train' after ")
    assert "(RuntimeError: Connection closed by peer [127.0.0.1]:1234)" in err[0]
    assert err[0].endswith(f"continue with train.resume={ckpt}")


def test_rollout_errors_are_left_to_the_trainer(tmp_path, capsys):
    wd = Watchdog(0, checkpoints=tmp_path)
    with pytest.raises(RolloutError), wd.phase("generate"):
        raise RolloutError("server down")
    assert capsys.readouterr().err == ""


def test_zero_limit_starts_no_thread(tmp_path):
    wd = Watchdog(0, checkpoints=tmp_path).start()
    assert not wd.enabled and wd._thread is None
    with wd.phase("train"):
        time.sleep(0.05)
    wd.stop()


def test_resume_hint_ignores_half_written_checkpoints(tmp_path):
    (tmp_path / "step-000009").mkdir()  # no trainer_state.json: not complete
    assert resume_hint(tmp_path).startswith("no complete checkpoint")
    done = _checkpoint(tmp_path, "step-000001", 1)
    assert resume_hint(tmp_path).endswith(f"train.resume={done}")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.phase_timeout_s=-1", "train.phase_timeout_s must be >= 0"),
        ("train.dist_timeout_s=0", "train.dist_timeout_s must be > 0"),
    ],
)
def test_config_rejects_bad_timeouts(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    cfg = load_config(None, [])
    assert cfg.train.phase_timeout_s == 7200 and cfg.train.dist_timeout_s == 1800
