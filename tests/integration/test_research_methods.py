"""REBEL, RENT and OPO end to end on the tiny model: real rollouts (vLLM CPU or transformers),
real DeepSpeed, real rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.trainer import Trainer
from tests.tiny_runs import tiny_cfg

pytestmark = pytest.mark.slow

LAYER = "model.layers.0.mlp.down_proj.weight"


def small_cfg(out: Path, model: Path, *extra: str):
    """A 2-step config on the tiny model (no warm-up, no eval, wandb off), 4 prompts x 4."""
    return tiny_cfg(out, model, *extra)


def test_rebel_vllm_two_steps(tmp_path, tiny_model_dir):
    out = tmp_path / "rebel"
    trainer = Trainer(small_cfg(out, tiny_model_dir, "train.algorithm=rebel", "rebel.eta=0.5"))
    history = trainer.train()
    assert len(history) == 2
    for m in history:
        assert m["rebel/pairs"] == 4 * 6  # 4 groups of 4 samples, no invalid sample
        assert torch.isfinite(torch.tensor(m["loss"])) and m["loss"] > 0
        assert m["tis/mismatch_abs_mean"] < 1e-4  # trainer and vLLM agree: weights were synced
        # One update per batch: logp == logp_old, so every residual is -(R_i - R_j).
        assert m["rebel/pair_logratio_abs_mean"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["weight_version"] == 2.0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(out / "checkpoints" / "final" / "model.safetensors"))
    assert not torch.equal(before[LAYER], after[LAYER])


def test_rebel_micro_batch_size_does_not_change_the_update(tmp_path, tiny_model_dir):
    """Micro-batches of 1 group x 4 and 4 groups x 1, two updates per batch: same weights."""
    weights = []
    for mb in (16, 4):
        out = tmp_path / f"mb{mb}"
        cfg = small_cfg(
            out,
            tiny_model_dir,
            "train.algorithm=rebel",
            "rollout.engine=hf",
            "train.steps=1",
            "train.updates_per_batch=2",  # the 2nd update regresses against logp_old
            f"train.micro_batch_size_per_device={mb}",
            "optim.eps=1.0",  # Adam's step ~ lr * g: weights compare gradients
            "optim.lr=0.1",
        )
        history = Trainer(cfg).train()
        assert history[0]["rebel/pair_logratio_abs_mean"] > 0  # logp moved from logp_old
        weights.append(load_file(str(out / "checkpoints" / "final" / "model.safetensors")))
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = 0.0
    for name, w in weights[0].items():
        assert torch.allclose(w, weights[1][name], atol=1e-5), name
        moved = max(moved, float((w - initial[name]).abs().max()))
    assert moved > 1e-4


@torch.no_grad()
def loop_mean_entropy(model, prompt_ids: list[int], completion_ids: list[int], temp: float):
    """Mean over completion tokens of -sum_v p log p, one unpadded sequence, float64."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0].double() / temp
    total = 0.0
    for k in range(len(completion_ids)):
        p = torch.softmax(logits[len(prompt_ids) - 1 + k], dim=-1)
        total += float(-(p * p.log()).sum())
    return total / len(completion_ids)


def test_rent_reward_is_minus_the_policys_mean_token_entropy(tmp_path, tiny_model_dir):
    cfg = small_cfg(
        tmp_path / "rent",
        tiny_model_dir,
        "rollout.engine=hf",
        "rollout.temperature=0.7",
        "train.steps=1",
        "rewards=[{name: neg_entropy}]",
    )
    trainer = Trainer(cfg)
    groups, _ = trainer.algorithm.source.collect_groups(0, trainer.engine)
    model = trainer.engine.module
    samples = [s for g in groups for s in g]
    assert len(samples) == 16
    for s in samples:
        ro = s.rollout
        want = -loop_mean_entropy(model, ro.prompt_ids, ro.completion_ids, 0.7)
        assert s.reward == pytest.approx(want, abs=1e-4)
    assert len({round(s.reward, 6) for s in samples}) > 1
    history = trainer.train()  # the reward trains like any other
    assert history[0]["reward/mean"] < 0 and torch.isfinite(torch.tensor(history[0]["loss"]))


def test_opo_rejects_rollouts_from_stale_weights(tmp_path, tiny_model_dir):
    cfg = small_cfg(
        tmp_path / "opo", tiny_model_dir, "rollout.engine=hf", "advantage.estimator=opo"
    )
    trainer = Trainer(cfg)
    trainer.train_step()  # step 0: rollouts of version 0, then the engine gets version 1
    assert trainer.algorithm.source.engine.weight_version == 1
    trainer.train_step()  # on-policy again
    # The trainer has now taken 2 optimizer steps; an engine left at version 1 is stale.
    trainer.algorithm.source.engine.weight_version = 1
    with pytest.raises(RuntimeError, match=r"weight version\(s\) \[1\] while the trainer's"):
        trainer.algorithm.make_batch(trainer.step, trainer.engine)
