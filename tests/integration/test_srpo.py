"""SRPO through RolloutSource with a fake engine: history resampling, stages, resume."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.data.arithmetic import parse, solve
from posttrain.data.curriculum import load_stage_rows
from posttrain.models import build_tokenizer
from posttrain.rollout.engine import Rollout, SamplingConfig
from posttrain.rollout.source import RolloutSource

ROOT = Path(__file__).resolve().parents[2]
_EXPR = re.compile(r"[0-9]+[+-][0-9]+")


class SolvesSmallSums:
    """A fake engine: answers `a+b` / `a-b` correctly when a < 5, else "x" (wrong)."""

    weight_version = 0

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        out = []
        for i, ids in enumerate(prompt_ids):
            expr = _EXPR.findall(self.tok.decode(ids))[-1]
            text = str(solve(expr)) if parse(expr)[0] < 5 else "x"
            comp = self.tok(text, add_special_tokens=False)["input_ids"]
            for _ in range(sampling.n):
                out.append(Rollout(i, ids, comp, [0.0] * len(comp), text, "stop", 0))
        return out

    def load_weights(self, named_tensors, version: int) -> float:
        return 0.0


def _source(*overrides: str) -> tuple[RolloutSource, object]:
    cfg = load_config(
        None,
        [
            "data.task={max_operand: 9, ops: ['+']}",
            "data.train_size=12",
            "data.eval_size=4",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=2",
            "rollout.history_resampling=true",
            *overrides,
        ],
    )
    from posttrain.data.splits import load_train_eval_rows

    train, held = load_train_eval_rows(cfg)
    tok = build_tokenizer()
    return RolloutSource(cfg, tok, SolvesSmallSums(tok), train, held, load_stage_rows(cfg)), train


def test_all_correct_prompts_leave_after_epoch():
    source, train = _source()
    solvable = sum(parse(r["prompt"])[0] < 5 for r in train)
    assert 0 < solvable < len(train) - 4
    sizes = []
    for step in range(6):  # 3 steps = 1 epoch of 12 prompts
        groups, metrics = source.collect_groups(step)
        sizes.append((metrics["data/pool_size"], metrics["data/pool_removed"]))
        assert len(groups) == 4
    removed = float(solvable)
    assert sizes[:3] == [(12.0, 0.0)] * 3
    assert sizes[3] == (12.0 - removed, removed)
    pool = source.stream.pool.pool
    assert all(parse(train[i]["prompt"])[0] >= 5 for i in pool)


def test_source_state_round_trip_and_stages():
    stages = (
        "data.stages=[{task: {max_operand: 4, ops: ['+']}, steps: 2, train_size: 6}, {steps: 3}]"
    )
    a, _ = _source(stages, "train.steps=5")
    b, _ = _source(stages, "train.steps=5")
    prompts = []
    for step in range(3):
        _, metrics = a.collect_groups(step)
        prompts.append(metrics["data/stage"])
    assert prompts == [1.0, 1.0, 2.0]
    b.load_state_dict(a.state_dict())
    for step in range(3, 8):
        ga, ma = a.collect_groups(step)
        gb, mb = b.collect_groups(step)
        assert [g[0].rollout.prompt_ids for g in ga] == [g[0].rollout.prompt_ids for g in gb]
        assert ma["data/pool_size"] == mb["data/pool_size"] and ma["data/stage"] == 2.0


@pytest.mark.slow
def test_srpo_recipe_trains_through_stages(tmp_path, tiny_model_dir):
    from posttrain.trainer import Trainer

    task = "{max_operand: 19, ops: ['+'], pad_width: 2}"
    cfg = load_config(
        ROOT / "recipes" / "srpo_tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            f"train.output_dir={tmp_path / 'srpo'}",
            "warmup.steps=0",
            "train.steps=3",
            f"data.stages=[{{task: {task}, train_size: 6, steps: 1}}, {{train_size: 6, steps: 1}}]",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=4",
            "train.micro_batch_size_per_device=16",
            "eval.num_problems=0",
            "log.wandb=disabled",
            "log.progress=false",
        ],
    )
    history = Trainer(cfg).train()
    assert [m["data/stage"] for m in history] == [1.0, 2.0, 2.0]
    assert [m["data/pool_size"] for m in history] == [6.0, 6.0, 6.0]
    assert [m["data/epoch"] for m in history] == [0.0, 0.0, 1.0]
