"""Exact data accounting: `<output_dir>/data_ids.jsonl` names the rows every step consumed, and a
run killed (SIGKILL) or stopped, then resumed with `train.resume=auto`, writes the file of a
straight run: every id of every epoch exactly once, none replayed or skipped.

The expected ids come from the documented rule (epoch e is the rows shuffled with
`random.Random(data.seed + e)`, drawn in order), for GRPO with async prefetch across epoch
boundaries and for SFT; with the SRPO pool (history resampling, two curriculum stages) the
resumed run's ids and pool sizes equal the straight run's while rows actually leave the pool.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.runtime.checkpoint import STATE_FILE, latest
from posttrain.runtime.data_log import FILE, read_data_ids
from posttrain.trainer import Trainer
from tests.tiny_runs import SFT_SMALL, TINY_RUN, read_jsonl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ROWS = 6  # data.train_size: an epoch is 1.5 steps of 4 prompts
# async prefetch (the batch of step n+1 is generated while step n trains), a checkpoint every 3
GRPO_ASYNC = (
    *TINY_RUN,
    "rollout.engine=hf",
    f"data.train_size={ROWS}",
    "rollout.max_staleness=1",
    "train.steps=9",
    "train.save_every=3",
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _expected(n_rows: int, seed: int, per_step: int, steps: int) -> list[dict]:
    """Each step's (ids, epochs) by the documented rule, with a naive loop."""
    drawn: list[tuple[int, int]] = []
    epoch = 0
    while len(drawn) < per_step * steps:
        order = list(range(n_rows))
        random.Random(seed + epoch).shuffle(order)
        drawn += [(epoch, i) for i in order]
        epoch += 1
    out = []
    for s in range(steps):
        chunk = drawn[s * per_step : (s + 1) * per_step]
        out.append(
            {
                "step": s + 1,
                "epoch": chunk[0][0],
                "ids": [i for _, i in chunk],
                "epochs": [e for e, _ in chunk],
            }
        )
    return out


def _each_epoch_once(rows: list[dict], n_rows: int | None = None) -> None:
    """No id twice within an epoch; every complete epoch (all but the last) holds every row."""
    by_epoch: dict[tuple[int, int], list[int]] = defaultdict(list)
    for row in rows:
        for e, i in zip(row["epochs"], row["ids"], strict=True):
            by_epoch[(row.get("stage", 0), e)].append(i)
    for key, ids in by_epoch.items():
        assert len(ids) == len(set(ids)), f"stage/epoch {key}: an id replayed: {ids}"
    if n_rows is not None:
        last = max(by_epoch)
        for key, ids in by_epoch.items():
            if key != last:
                assert sorted(ids) == list(range(n_rows)), f"epoch {key}: rows skipped: {ids}"


def _cfg(out: Path, model: Path, *extra: str, recipe: Path | None = None):
    base = [f"model.path={model}", f"train.output_dir={out}"]
    return load_config(recipe, [*base, *extra])


def _kill_when(proc: subprocess.Popen, path: Path, lines: int, timeout_s: float = 600) -> None:
    """SIGKILL the process group as soon as `path` has `lines` lines."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was killed"
        if path.is_file() and path.read_text().count("\n") >= lines:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"{path} never reached {lines} lines")


def test_async_grpo_sigkilled_and_resumed_consumes_every_row_once(tmp_path, tiny_model_dir):
    straight = tmp_path / "straight"
    cfg = _cfg(straight, tiny_model_dir, *GRPO_ASYNC)
    Trainer(cfg).train()
    want = read_data_ids(straight / FILE)
    assert want == _expected(ROWS, cfg.data.seed, 4, 9)
    _each_epoch_once(want, ROWS)

    killed = tmp_path / "killed"
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text("train:\n  algorithm: grpo\n")
    cmd = [sys.executable, "-m", "posttrain.cli", "train", str(recipe)]
    cmd += [f"model.path={tiny_model_dir}", f"train.output_dir={killed}", *GRPO_ASYNC]
    err = (tmp_path / "killed.err").open("w")
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
    )
    _kill_when(proc, killed / FILE, 5)  # step 5 consumed; the newest checkpoint is step 3
    left = read_data_ids(killed / FILE)  # the kill may have torn the last line: still readable
    assert len(left) >= 5 and left == want[: len(left)]
    ckpt = latest(killed / "checkpoints")
    assert ckpt is not None and not ckpt.name.endswith(".tmp")
    at = _step(ckpt)

    resumed = Trainer(_cfg(killed, tiny_model_dir, *GRPO_ASYNC, "train.resume=auto"))
    history = resumed.train()
    assert resumed.step == 9 and len(history) == 9 - at
    assert read_data_ids(killed / FILE) == want  # cut back to the checkpoint, then the rest
    assert (killed / FILE).read_text().count("\n") == 9  # and nothing torn left inside


def _step(ckpt: Path) -> int:
    return int(json.loads((ckpt / STATE_FILE).read_text())["step"])


def test_sft_crosses_epochs_and_resumes_past_a_kill_leftover(tmp_path, tiny_model_dir):
    """SFT (offline): 8 rows a step over 12 rows. The stopped run is left as a kill during its
    last checkpoint leaves it: a line past the newest checkpoint, and a torn line after it."""
    recipe = ROOT / "recipes" / "sft_tiny.yaml"
    sft = (*SFT_SMALL, "data.train_size=12", "train.save_every=2")
    straight = tmp_path / "straight"
    cfg = _cfg(straight, tiny_model_dir, *sft, "train.steps=6", recipe=recipe)
    Trainer(cfg).train()
    want = read_data_ids(straight / FILE)
    assert want == _expected(12, cfg.data.seed, 8, 6)
    _each_epoch_once(want, 12)

    out = tmp_path / "stopped"
    Trainer(_cfg(out, tiny_model_dir, *sft, "train.steps=5", recipe=recipe)).train()
    final = out / "checkpoints" / "final"
    os.replace(final, out / "checkpoints" / "final.tmp")  # killed before its rename
    with (out / FILE).open("a") as fh:
        fh.write('{"step": 6, "epoch": 3, "ids": [1')  # and a write of step 6 cut short
    assert latest(out / "checkpoints").name == "step-000004"
    assert [r["step"] for r in read_data_ids(out / FILE)] == [1, 2, 3, 4, 5]

    cfg = _cfg(out, tiny_model_dir, *sft, "train.steps=6", "train.resume=auto", recipe=recipe)
    history = Trainer(cfg).train()
    assert len(history) == 2  # steps 5 and 6
    assert read_data_ids(out / FILE) == want


def test_srpo_pool_and_stages_resume_with_the_same_rows(tmp_path, tiny_model_dir):
    """SRPO's pool (recipes/srpo_tiny.yaml): prompts whose samples are all "correct" leave at
    epoch boundaries (here "correct" = a letter a-m in the completion, which about half of the
    random model's completions hold); the run stopped at step 5 and resumed writes the same ids
    and pool sizes as the straight run."""
    recipe = ROOT / "recipes" / "srpo_tiny.yaml"
    srpo = (
        "warmup.steps=0",
        "rollout.engine=hf",
        "data.stages=[{train_size: 6, steps: 2}, {train_size: 8, steps: 1}]",
        "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=6",
        "rewards=[{name: regex_match, kwargs: {pattern: '[a-m]'}}]",
        "eval.reward=regex_match",
        "eval.num_problems=0",
        "train.eval_every=0",
        "train.micro_batch_size_per_device=4",
        "train.save_every=2",
        "log.wandb=disabled",
        "log.progress=false",
    )
    straight = tmp_path / "straight"
    Trainer(_cfg(straight, tiny_model_dir, *srpo, "train.steps=14", recipe=recipe)).train()
    want = read_data_ids(straight / FILE)
    rows = read_jsonl(straight / "metrics.jsonl")
    assert [r["stage"] for r in want] == [0, 0] + [1] * 12
    assert max(r["data/pool_removed_total"] for r in rows) > 0, "no row left the pool"
    _each_epoch_once(want)
    epochs: dict[int, set[int]] = defaultdict(set)  # stage 1's rows by epoch
    for row in want[2:]:
        for e, i in zip(row["epochs"], row["ids"], strict=True):
            epochs[e].add(i)
    for e in sorted(epochs)[1:-1]:  # complete epochs: a row that left never comes back
        assert epochs[e] <= epochs[e - 1]
    pools = [r["data/pool_size"] for r in rows]

    out = tmp_path / "stopped"
    Trainer(_cfg(out, tiny_model_dir, *srpo, "train.steps=5", recipe=recipe)).train()
    cfg = _cfg(out, tiny_model_dir, *srpo, "train.steps=14", "train.resume=auto", recipe=recipe)
    Trainer(cfg).train()
    assert read_data_ids(out / FILE) == want
    resumed_rows = read_jsonl(out / "metrics.jsonl")[-9:]  # steps 6..14
    assert [r["data/pool_size"] for r in resumed_rows] == pools[5:]
