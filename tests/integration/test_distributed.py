"""Two processes (torchrun, gloo) on CPU train exactly like one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_runs import torchrun

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"

COMMON = [
    "train.steps=3",
    "train.micro_batch_size_per_device=4",
    "rollout.engine=hf",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=6",
    "data.train_size=64",
    "data.max_prompt_tokens=32",
    "eval.num_problems=0",
    "optim.lr=1e-3",
    "log.wandb=disabled",
    "log.progress=false",
]


def _run(args: list[str], out: Path, model: Path, extra: list[str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        *args,
        "train",
        str(RECIPE),
        "warmup.steps=0",
        f"model.path={model}",
        f"train.output_dir={out}",
        *COMMON,
    ]
    cmd += extra
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_match_one(tmp_path, tiny_model_dir, zero_stage):
    one = _run([sys.executable, "-m", "posttrain.cli"], tmp_path / "one", tiny_model_dir, [])
    two = _run(
        [*torchrun(), "-m", "posttrain.cli"],
        tmp_path / "two",
        tiny_model_dir,
        [f"train.zero_stage={zero_stage}"],
    )
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
