"""PPO pieces without rollouts: config rules, GAE wiring (loop-checked), value loss share,
KL controller state, and the ActorCritic module (export, param groups, critic-only forward)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain import advantages as adv_fn
from posttrain.algorithms.base import StepBatch
from posttrain.algorithms.ppo import PPO, global_moments, whiten_global
from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.losses import kl_estimate
from posttrain.models.actor_critic import ActorCritic, load_actor_critic

PPO_ARGS = ["train.algorithm=ppo", "advantage.estimator=gae"]


def ppo_cfg(*extra: str):
    return load_config(None, [*PPO_ARGS, *extra])


# --------------------------------------------------------------------------- config


def test_ppo_config_defaults_and_single_sample():
    cfg = ppo_cfg("rollout.samples_per_prompt=1", "train.micro_batch_size_per_device=4")
    p = cfg.ppo
    assert (p.value_head, p.vf_coef, p.value_clip, p.gamma, p.lam) == (
        "separate",
        0.1,
        0.2,
        1.0,
        0.95,
    )
    assert p.whiten_advantages and p.critic_warmup_steps == 0
    with pytest.raises(ConfigError, match=r"samples_per_prompt must be >= 2 for GRPO"):
        load_config(None, ["rollout.samples_per_prompt=1"])


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["advantage.estimator=gae"], r"advantage\.estimator=gae.*train\.algorithm=ppo"),
        (["train.algorithm=ppo"], r"train\.algorithm=ppo.*advantage\.estimator=gae"),
        (["ppo.vf_coef=0.5"], r"ppo\.vf_coef.*train\.algorithm='grpo'"),
        (["ppo.critic_warmup_steps=3", "ppo.lam=0.9"], r"ppo\.lam.*train\.algorithm"),
        (["kl.in_reward=true"], r"kl\.in_reward.*train\.algorithm=ppo"),
        (["kl.target=1.0"], r"kl\.target.*train\.algorithm=ppo"),
        ([*PPO_ARGS, "kl.coef=0.1", "kl.target=1.0"], r"kl\.target.*kl\.in_reward=true"),
        ([*PPO_ARGS, "kl.in_reward=true", "kl.target=1.0"], r"kl\.target and kl\.coef"),
        ([*PPO_ARGS, "ppo.value_head=both"], r"ppo\.value_head.*separate, shared"),
        ([*PPO_ARGS, "ppo.vf_coef=0"], r"ppo\.vf_coef must be > 0"),
        ([*PPO_ARGS, "ppo.lam=1.5"], r"ppo\.gamma and ppo\.lam"),
        ([*PPO_ARGS, "ppo.value_clip=0"], r"ppo\.value_clip"),
        ([*PPO_ARGS, "ppo.critic_warmup_steps=-1"], r"ppo\.critic_warmup_steps"),
        ([*PPO_ARGS, "ppo.critic_lr_multiplier=0"], r"ppo\.critic_lr_multiplier"),
        (
            [*PPO_ARGS, "ppo.value_head=shared", "ppo.critic_path=x"],
            r"ppo\.critic_path.*value_head=separate",
        ),
        ([*PPO_ARGS, "rollout.filter_zero_variance_groups=true"], r"filter_zero_variance"),
        ([*PPO_ARGS, "model.lora.r=4"], r"model\.lora\.r.*ppo"),
        ([*PPO_ARGS, "train.micro_batch_size_per_device=7"], r"micro_batch_size_per_device=7"),
    ],
)
def test_ppo_config_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


# --------------------------------------------------------------------------- whitening


def test_global_moments_and_whiten_global_single_rank():
    x = torch.tensor([[1.0, 2.0, 9.0, 0.0], [4.0, -3.0, 0.0, 7.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    vals = [1.0, 2.0, 4.0, -3.0, 0.0]
    n, mean, var = global_moments(x, mask)
    m = sum(vals) / 5
    assert (n, mean) == (5.0, pytest.approx(m))
    assert var == pytest.approx(sum((v - m) ** 2 for v in vals) / 4)
    assert torch.allclose(whiten_global(x, mask), adv_fn.whiten(x, mask))


# --------------------------------------------------------------------------- GAE wiring


def _batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two right-padded samples, prompt positions masked out, one sample with 3 tokens."""
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]], dtype=torch.float)
    g = torch.Generator().manual_seed(3)
    t = {
        "mask": mask,
        "logp_old": -torch.rand(2, 5, generator=g),
        "logp_ref": -torch.rand(2, 5, generator=g),
        "values_old": torch.randn(2, 5, generator=g),
        "entropy_old": torch.rand(2, 5, generator=g),
    }
    return t, torch.tensor([1.0, -0.5])


def _loop_gae(t, rewards, beta, gamma, lam):
    """Naive per-token loop of `gae` (docs/algorithms.md), k1 KL in the reward, not whitened."""
    adv = torch.zeros(2, 5)
    ret = torch.zeros(2, 5)
    for i in range(2):
        idx = [j for j in range(5) if t["mask"][i, j] > 0]
        r = [-beta * float(t["logp_old"][i, j] - t["logp_ref"][i, j]) for j in idx]
        r[-1] += float(rewards[i])
        v = [float(t["values_old"][i, j]) for j in idx] + [0.0]
        running = 0.0
        for k in reversed(range(len(idx))):
            delta = r[k] + gamma * v[k + 1] - v[k]
            running = delta + gamma * lam * running
            adv[i, idx[k]] = running
            ret[i, idx[k]] = running + v[k]
    return adv, ret


@pytest.mark.parametrize("whiten", [True, False])
def test_advantages_match_loop(whiten):
    cfg = ppo_cfg(
        "kl.coef=0.2",
        "kl.in_reward=true",
        "kl.estimator=k1",
        "ppo.gamma=0.9",
        "ppo.lam=0.8",
        f"ppo.whiten_advantages={str(whiten).lower()}",
    )
    algo = PPO(cfg, source=None, ref_model=None)
    t, rewards = _batch()
    metrics = algo._advantages(t, rewards, n_samples=2)
    adv, ret = _loop_gae(t, rewards, 0.2, 0.9, 0.8)
    assert torch.allclose(t["returns"], ret, atol=1e-6)
    if whiten:
        vals = [float(adv[i, j]) for i in range(2) for j in range(5) if t["mask"][i, j]]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) + 1e-8)
        adv = torch.where(t["mask"].bool(), (adv - mean) / std, torch.zeros(()))
    assert torch.allclose(t["adv"], adv, atol=1e-6)
    kl = (t["logp_old"] - t["logp_ref"]) * t["mask"]
    assert metrics["kl/ref_per_sample"] == pytest.approx(float(kl.sum()) / 2)
    assert metrics["kl"] == pytest.approx(float(kl.sum()) / 5)
    assert metrics["kl/beta"] == 0.2


def test_kl_only_in_loss_leaves_token_rewards_alone():
    cfg = ppo_cfg("kl.coef=0.2", "ppo.whiten_advantages=false", "ppo.lam=0.5")
    algo = PPO(cfg, source=None, ref_model=None)
    t, rewards = _batch()
    algo._advantages(t, rewards, n_samples=2)
    adv, _ = _loop_gae(t, rewards, 0.0, 1.0, 0.5)
    assert torch.allclose(t["adv"], adv, atol=1e-6)


def test_adaptive_kl_controller_updates_and_round_trips():
    cfg = ppo_cfg("kl.coef=0.1", "kl.in_reward=true", "kl.target=0.05", "kl.horizon=10")
    algo = PPO(cfg, source=None, ref_model=None)
    t, rewards = _batch()
    kl_seq = float((kl_estimate(t["logp_old"], t["logp_ref"], "k3") * t["mask"]).sum()) / 2
    metrics = algo._advantages(t, rewards, n_samples=4)
    err = max(min((kl_seq - 0.05) / 0.05, 0.2), -0.2)
    assert metrics["kl/beta"] == 0.1  # the beta these rewards used
    assert algo.beta == pytest.approx(0.1 * (1 + err * 4 / 10))
    algo.source = SimpleNamespace(state_dict=dict, load_state_dict=lambda s: None)
    state = algo.state_dict()
    fresh = PPO(cfg, source=algo.source, ref_model=None)
    fresh.load_state_dict(state)
    assert fresh.beta == algo.beta and fresh.controller.beta == algo.beta


# --------------------------------------------------------------------------- loss shares


def test_critic_warmup_loss_is_vf_coef_times_value_loss():
    cfg = ppo_cfg("ppo.vf_coef=0.5", "ppo.value_clip=0.2")
    algo = PPO(cfg, source=None, ref_model=None)
    step = StepBatch([], token_total=4.0, step_state={"critic_only": True})
    values = torch.tensor([[9.0, 0.5, 0.1, 2.0], [9.0, -1.0, 9.0, 9.0]])
    mb = {
        "mask": torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]),
        "values_old": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        "returns": torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]),
    }
    loss, shares = algo.loss(SimpleNamespace(values=values, logits=None), mb, step)
    # V = 9 (clipped to 0.2), 0.5 (0.2), 0.1 (0.1), -1 (-0.2); G = 1 each
    per_tok = [max(64.0, 0.64), max(0.25, 0.64), max(0.81, 0.81), max(4.0, 1.44)]
    expected = 0.5 * sum(0.5 * x for x in per_tok) / 4.0
    assert float(loss) == pytest.approx(expected)
    assert shares["value/clip_frac"] == pytest.approx(1 / 4)  # only V = 0.5 clips upward
    assert "policy/loss" not in shares


# --------------------------------------------------------------------------- ActorCritic


def test_actor_critic_separate_exports_policy_and_splits_params(tiny_model_dir):
    from posttrain.models import load_policy

    cfg = ppo_cfg("ppo.critic_lr_multiplier=3.0")
    model = load_actor_critic(str(tiny_model_dir), cfg=cfg)
    plain = load_policy(tiny_model_dir)
    exported = model.export_state_dict(model.state_dict())
    assert set(exported) == set(plain.state_dict())
    assert all(torch.equal(exported[k], v) for k, v in plain.state_dict().items())
    assert model.export_module() is model.policy
    groups = model.optimizer_groups(1e-3)
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == {id(p) for p in model.parameters()}
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(3e-3)]
    ids_t = torch.tensor([[5, 17, 33, 2, 8]])
    out = model(input_ids=ids_t)
    assert out.values.shape == (1, 5) and out.values.dtype == torch.float32
    assert torch.equal(out.values, torch.zeros(1, 5))  # fresh head starts at 0
    assert torch.allclose(out.logits, plain(input_ids=ids_t).logits)


@pytest.mark.parametrize("head", ["separate", "shared"])
def test_critic_only_forward_gives_policy_no_gradient(tiny_model_dir, head):
    model = load_actor_critic(str(tiny_model_dir), cfg=ppo_cfg(f"ppo.value_head={head}"))
    assert isinstance(model, ActorCritic)
    critic = {id(p) for p in model.critic_parameters()}
    model.critic_only = True
    out = model(input_ids=torch.tensor([[5, 17, 33, 2, 8]]))
    assert out.logits is None
    ((out.values - 1.0) ** 2).sum().backward()
    for p in model.parameters():
        if id(p) in critic:
            continue
        assert p.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.critic_parameters())
