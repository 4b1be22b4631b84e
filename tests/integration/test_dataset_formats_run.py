"""A 2-step run on each real dataset format, as the rows come (tests/unit/test_dataset_formats.py
writes the same fixtures): GRPO with its reward on GSM8K / MATH / HumanEval / IFEval rows, DPO on
chat-message preference rows. Tiny model, vLLM engine (TINY_RUN), a few prompts and tokens.
"""

from __future__ import annotations

import json
import math

import pytest

from posttrain.config import load_config
from posttrain.trainer import Trainer
from tests.tiny_runs import tiny_cfg
from tests.unit.test_dataset_formats import (
    BOXED,
    IFEVAL,
    MATH_ROWS,
    gsm8k_rows,
    hh_rows,
    humaneval_rows,
    write_jsonl,
    write_parquet,
)

pytestmark = pytest.mark.slow


def _math_rows() -> list[dict]:
    return [
        {"problem": p, "level": "Level 2", "type": "Algebra", "solution": s}
        for p, s, _, _ in MATH_ROWS
    ]


def _ifeval_rows() -> list[dict]:
    return [
        {"key": i, "prompt": f"Write (task {i}).", "instruction_id_list": ids, "kwargs": kw}
        for i, (ids, kw, _, _) in enumerate(IFEVAL)
    ]


# name -> (write the file, reward, extra overrides)
GRPO_FORMATS = {
    "gsm8k": (
        lambda d: write_jsonl(d / "gsm8k.jsonl", gsm8k_rows()),
        "math_answer",
        [f"data.prompt_template={json.dumps('{question}' + BOXED)}"],
    ),
    "math": (
        lambda d: write_parquet(d / "math.parquet", _math_rows()),
        "math_answer",
        ["data.columns={answer: solution}", f"data.prompt_template={json.dumps('{problem}')}"],
    ),
    "humaneval": (
        lambda d: write_jsonl(d / "humaneval.jsonl", humaneval_rows()),
        "code_tests",
        [],
    ),
    "ifeval": (
        lambda d: write_parquet(d / "ifeval.parquet", _ifeval_rows()),
        "ifeval",
        [],
    ),
}


@pytest.mark.parametrize("name", sorted(GRPO_FORMATS))
def test_grpo_two_steps_on_format(tmp_path, tiny_model_dir, name):
    write, reward, extra = GRPO_FORMATS[name]
    source = write(tmp_path)
    cfg = tiny_cfg(
        tmp_path / "run",
        tiny_model_dir,
        f"data.source={source}",
        "data.train_size=8",
        "data.eval_size=4",
        "data.max_prompt_tokens=320",
        f"rewards=[{{name: {reward}}}]",
        *extra,
    )
    history = Trainer(cfg).train()
    assert len(history) == 2 and history[-1]["weight_version"] == 2.0
    for m in history:
        assert math.isfinite(m["loss"])
        # every sample was judged (no None from a missing or unparsable gold / tests column)
        assert m["reward/masked_count"] == 0.0
        assert 0.0 <= m[f"reward/{reward}/mean"] <= 1.0
        assert not [k for k in m if "/errors/" in k and m[k]], m


def test_dpo_two_steps_on_chat_preference_rows(tmp_path, tiny_model_dir):
    source = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"train.output_dir={tmp_path / 'run'}",
            f"data.source={source}",
            "data.train_size=10",
            "data.eval_size=4",
            "train.algorithm=dpo",
            "train.steps=2",
            "dpo.pairs_per_step=4",
            "dpo.max_length=256",
            "dpo.bad_rows=error",
            "train.micro_batch_size_per_device=4",
            "eval.num_problems=4",
            "log.wandb=disabled",
            "log.progress=false",
        ],
    )
    history = Trainer(cfg).train()
    assert len(history) == 2
    # step 1: policy == reference, so the sigmoid DPO loss is log 2
    assert history[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-4)
    assert math.isfinite(history[1]["loss"])
