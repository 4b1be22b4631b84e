"""A run in a process where an earlier in-process vLLM engine is still referenced.

Finalising a vLLM engine destroys vLLM's process-global parallel groups and torch.distributed's
default group; an old engine collected after a new run started used to take that run down
("pipeline model parallel group is not initialized"). A new Trainer closes earlier engines first.
"""

from __future__ import annotations

import gc

import pytest

from posttrain.rollout import make_engine
from posttrain.trainer import Trainer
from tests.tiny_runs import read_jsonl, tiny_cfg

pytestmark = pytest.mark.slow


def test_an_earlier_engine_is_closed_before_a_new_run(tmp_path, tiny_model_dir):
    old = make_engine("vllm", str(tiny_model_dir), max_model_len=64, seed=0, kv_cache_gib=0.25)
    trainer = Trainer(tiny_cfg(tmp_path / "run", tiny_model_dir))
    assert not hasattr(old, "llm")  # shut down before the run set up its process groups
    old.close()  # idempotent
    del old
    gc.collect()  # finalising it now must leave the run's groups alone
    history = trainer.train()
    assert len(history) == 2 and trainer.step == 2
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
