"""Storage faults: the disk fills while a checkpoint is written.

The output dir is a small tmpfs the test mounts (we run as root): the tiny model's checkpoint is
~13 MB, so on 20 MiB the step-1 checkpoint fits and the step-2 one runs out of space in the
middle of DeepSpeed's `torch.save`. The run ends with exit status 2 and one line naming the
checkpoint and "no space left on device"; the partial `.tmp` is gone, so `train.resume=auto` can
only pick the intact step-1 checkpoint, and once space is freed (the tmpfs remounted larger) the
resumed run ends with the weights and data ids of a straight run. Under torchrun both ranks learn
of the failure and end (no hang).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import load_config
from posttrain.errors import StorageError
from posttrain.runtime.checkpoint import latest
from posttrain.runtime.data_log import FILE, read_data_ids
from posttrain.trainer import Trainer
from tests.tiny_runs import SFT_SMALL, TINY_RUN, torchrun

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GRPO = (*TINY_RUN, "rollout.engine=hf", "train.steps=3", "train.save_every=1")
FITS_ONE = 20  # MiB: one checkpoint (~13 MB) and the logs, not two
ERROR = "could not be written: no space left on device (ENOSPC)"


@contextmanager
def small_fs(path: Path, mib: int) -> Iterator[Path]:
    """A `mib` MiB tmpfs mounted at `path` (unmounted after, whatever happens)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={mib}M", "tmpfs", str(path)]
    proc = subprocess.run(mount, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): needs root")
    try:
        yield path
    finally:  # lazily when this process still holds a file there (third_party.log)
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def _grow(path: Path, mib: int) -> None:
    """Free space: the tmpfs at `path` remounted with `mib` MiB."""
    remount = ["mount", "-o", f"remount,size={mib}M", str(path)]
    subprocess.run(remount, check=True)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_disk_full_mid_checkpoint_one_line_exit_2_and_resumable(tmp_path, tiny_model_dir):
    straight = tmp_path / "straight"
    overrides = [f"model.path={tiny_model_dir}", *GRPO]
    Trainer(load_config(None, [*overrides, f"train.output_dir={straight}"])).train()

    recipe = tmp_path / "grpo.yaml"
    recipe.write_text("train:\n  algorithm: grpo\n")
    with small_fs(tmp_path / "disk", FITS_ONE) as out:
        cmd = [sys.executable, "-m", "posttrain.cli", "train", str(recipe), *overrides]
        proc = subprocess.run(
            [*cmd, f"train.output_dir={out}"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        shown = f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
        assert proc.returncode == 2, shown
        assert "Traceback" not in proc.stdout + proc.stderr, shown
        lines = proc.stderr.splitlines()
        ckpts = out / "checkpoints"
        assert lines == [
            f"posttrain: error: checkpoint {ckpts / 'step-000002'} {ERROR}; the partial "
            f"step-000002.tmp was removed; newest complete checkpoint: {ckpts / 'step-000001'} "
            "(free space, then continue with train.resume=auto)"
        ], shown
        assert _entries(out) == ["step-000001"]  # no partial directory left to pick
        assert latest(ckpts) == ckpts / "step-000001"
        assert [r["step"] for r in read_data_ids(out / FILE)] == [1, 2]

        _grow(out, 64)
        cfg = load_config(None, [*overrides, f"train.output_dir={out}", "train.resume=auto"])
        resumed = Trainer(cfg)
        history = resumed.train()
        assert len(history) == 2  # steps 2 and 3, from the step-1 checkpoint
        a, b = _weights(straight / "checkpoints" / "final"), _weights(ckpts / "final")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert read_data_ids(out / FILE) == read_data_ids(straight / FILE)


def test_first_checkpoint_that_does_not_fit_leaves_nothing(tmp_path, tiny_model_dir):
    with small_fs(tmp_path / "disk", 8) as out:
        overrides = [f"model.path={tiny_model_dir}", *GRPO, f"train.output_dir={out}"]
        with pytest.raises(StorageError) as caught:
            Trainer(load_config(None, overrides)).train()
        message = str(caught.value)
        assert message.startswith(f"checkpoint {out / 'checkpoints' / 'step-000001'} {ERROR}")
        assert message.endswith(
            "no complete checkpoint was saved before it (free space, then rerun)"
        )
        assert _entries(out) == []
        assert latest(out / "checkpoints") is None


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_two_ranks_both_end_when_the_disk_fills(tmp_path, tiny_model_dir, zero_stage):
    """SFT under torchrun: the step-2 checkpoint does not fit. ZeRO-0: rank 0 writes the model
    and optimizer states (and fails), rank 1 only its RNG; ZeRO-2: each rank also writes its
    optimizer partition. Both ranks raise the error at the same collective and end."""
    recipe = ROOT / "recipes" / "sft_tiny.yaml"
    with small_fs(tmp_path / "disk", FITS_ONE) as out:
        cmd = [*torchrun(2), "-m", "posttrain.cli", "train", str(recipe)]
        cmd += [f"model.path={tiny_model_dir}", f"train.output_dir={out}", *SFT_SMALL]
        cmd += ["train.steps=4", "train.save_every=1", f"train.zero_stage={zero_stage}"]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        shown = f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-6000:]}"
        assert proc.returncode != 0, shown
        step2 = out / "checkpoints" / "step-000002"
        errors = [x for x in proc.stderr.splitlines() if x.startswith("posttrain: error:")]
        assert len(errors) == 2, shown  # one from each rank
        assert all(f"checkpoint {step2} {ERROR}" in x for x in errors), shown
        assert _entries(out) == ["step-000001"]
        assert latest(out / "checkpoints") == out / "checkpoints" / "step-000001"


def _fill(where: Path, leave: int) -> Path:
    """A file filling the filesystem at `where` up to `leave` free bytes (tmpfs: whole pages)."""
    filler = where / "filler"
    free = os.statvfs(where).f_bavail * os.statvfs(where).f_frsize
    with filler.open("wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def test_run_logs_on_a_full_disk_end_with_one_line_and_no_torn_line(tmp_path):
    """metrics.jsonl and data_ids.jsonl: appends on a disk that fills. Each failed append raises
    StorageError naming the file and ENOSPC, and cuts its partial line off: after space is freed,
    appending goes on and every line of the file reads back whole, in order."""
    from posttrain.runtime.data_log import DataLog, Drawn
    from posttrain.runtime.logging import RunLogger, read_metrics

    with small_fs(tmp_path / "disk", 1) as out:
        logger = RunLogger(out, wandb_mode="disabled")
        data_log = DataLog(out, enabled=True)
        big = {f"metric/{i}": float(i) for i in range(300)}  # a ~5 kB line: pages fill fast
        filler = _fill(out, 4096 * 2)
        written, failures = 0, []
        for step in range(1, 8):
            try:
                logger.log(step, big)
                written = step
            except StorageError as err:
                failures.append(str(err))
                break
        assert failures and written < 7  # the disk filled within a few lines
        assert failures[0].startswith(f"could not append to {out / 'metrics.jsonl'}: ")
        assert "no space left on device (ENOSPC); the partial line was removed" in failures[0]
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [*range(1, written + 1)]
        assert (out / "metrics.jsonl").read_text().endswith("\n")
        ids = Drawn.of([(0, i) for i in range(2000)])  # a ~10 kB line
        with pytest.raises(StorageError, match=r"could not append to .*data_ids\.jsonl: no space"):
            data_log.write(1, ids)
        assert read_data_ids(out / FILE) == [] and (out / FILE).read_text() == ""
        filler.unlink()  # space freed: the logs go on, whole
        logger.log(written + 1, big)
        data_log.write(1, ids)
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [*range(1, written + 2)]
        assert [r["step"] for r in read_data_ids(out / FILE)] == [1]
        logger.close()
