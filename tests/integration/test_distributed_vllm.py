"""Two ranks (torchrun, gloo, ZeRO-3), each with its own colocated vLLM replica, train exactly
like one process: the prompts are sharded over the replicas with per-prompt seeds and the
rollouts all-gathered, so the first steps' losses match a 1-process ZeRO-3 vLLM run (the 2-rank
run also offloads parameters and optimizer state to CPU memory); after every (streamed,
ZeRO-3-gathered) weight sync each rank's replica reproduces the trainer's logprobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_runs import torchrun

pytestmark = pytest.mark.slow
DRIVER = Path(__file__).with_name("distributed_vllm_driver.py")

OVERRIDES = [
    "train.steps=3",
    "train.zero_stage=3",
    "train.micro_batch_size_per_device=4",
    "rollout.engine=vllm",
    "rollout.kv_cache_gib=0.25",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=6",
    "data.source=arithmetic",
    "data.train_size=64",
    "data.max_prompt_tokens=32",
    "data.eval_size=8",
    "eval.num_problems=3",
    "eval.k=2",
    "eval.seeds=[0, 1]",
    "eval.reward=format_number",
    "optim.lr=1e-3",
    "loss.entropy_coef=0.01",  # on-policy GRPO losses are ~0; the entropy term is not
    "log.wandb=disabled",
    "log.progress=false",
    # Random weights never answer right; length varies, so this reward gives real gradients.
    "rewards=[{name: length_in_range, kwargs: {max_chars: 5}}]",
]


def _run(launcher: list[str], out: Path, model: Path, extra: list[str]) -> list[list[dict]]:
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [*launcher, str(DRIVER), str(out), f"model.path={model}", f"train.output_dir={out}"]
    proc = subprocess.run(
        cmd + OVERRIDES + extra, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = sorted(out.glob("rank*.json"))
    return [json.loads(f.read_text()) for f in files]


def test_two_vllm_ranks_match_one(tmp_path, tiny_model_dir):
    (one,) = _run([sys.executable], tmp_path / "one", tiny_model_dir, [])
    # ZeRO-Offload (optimizer state and parameters in CPU memory) changes where, not what.
    offload = ["train.offload_optimizer=true", "train.offload_params=true"]
    two = _run(torchrun(), tmp_path / "two", tiny_model_dir, offload)
    assert len(two) == 2
    for rank_rows in two:
        assert [r["world"] for r in rank_rows] == [2, 2, 2]
        assert [r["weight_version"] for r in rank_rows] == [1.0, 2.0, 3.0]
        for a, b in zip(one, rank_rows, strict=True):
            assert b["tokens/generated"] == a["tokens/generated"]  # the same samples
            assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=1e-6)
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
            assert b["time/sync_s"] > 0
    assert all(abs(r["loss"]) > 1e-3 and r["grad_norm"] > 1e-3 for r in one)  # not vacuous
    assert one[-1]["eval"] and all(rows[-1]["eval"] == one[-1]["eval"] for rows in two)
    for rows in [[one], two]:
        for rank_rows in rows:
            for r in rank_rows:
                # Every replica got the synced weights: sampler logprobs == trainer logprobs,
                # on the step's data (tis mismatch, all ranks) and on each rank's own samples.
                assert r["tis/mismatch_abs_mean"] < 1e-4
                assert r["replica_max_abs_diff"] < 1e-4
