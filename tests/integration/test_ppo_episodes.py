"""PPO with its critic on multi-turn calculator episodes: the step's advantages and returns are
GAE over the sampled tokens only (recomputed here from the step's own values_old, KL and
rewards), observation tokens get none, they never reach the policy or value loss, and a 2-step
PPO run with the hf engine trains on real episodes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from posttrain.algorithms.ppo import PPO
from posttrain.config import load_config
from posttrain.envs import environment_factory
from posttrain.errors import ConfigError
from posttrain.models import load_policy, load_tokenizer
from posttrain.models.actor_critic import load_actor_critic
from posttrain.rollout.engine import Rollout
from posttrain.rollout.episode_source import EpisodeSource

ROW = {"prompt": "What is 123 * 456?", "answer": "56088"}
MUL = '<tool_call>\n{"name": "multiply", "arguments": {"a": 123, "b": 456}}\n</tool_call>'
ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 56088, "b": 0}}\n</tool_call>'
# each episode's assistant turns (the last answers without a tool): rewards 1, 0, 0, 1
SCRIPTS = [[MUL, ADD, "56088"], ["1"], [MUL, "7"], [MUL, ADD, "56088"]]
BETA, GAMMA, LAM = 0.1, 0.9, 0.8


@dataclass
class ScriptedEngine:
    """Plays fixed assistant turns (the text's ids + the end-of-turn id) with fixed log-probs."""

    tokenizer: Any
    scripts: list[list[str]]
    weight_version: int = 0
    alive: list[int] = field(default_factory=list)
    calls: int = 0

    def generate(self, prompt_ids: list[list[int]], sampling: Any) -> list[Rollout]:
        if self.calls == 0:
            self.alive = list(range(len(self.scripts)))
        out = []
        for i, (ep, ctx) in enumerate(zip(self.alive, prompt_ids, strict=True)):
            text = self.scripts[ep][self.calls]
            ids = [*self.tokenizer(text, add_special_tokens=False)["input_ids"]]
            ids.append(self.tokenizer.eos_token_id)
            out.append(Rollout(i, ctx, ids, [-0.5] * len(ids), text, "stop", 0))
        self.calls += 1
        self.alive = [ep for ep in self.alive if len(self.scripts[ep]) > self.calls]
        return out

    def load_weights(self, named_tensors: Any, version: int) -> float:
        return 0.0


def _cfg(tmp_path, model_dir, *extra: str):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            "train.algorithm=ppo",
            "advantage.estimator=gae",
            "env.name=calculator",
            "data.source=env",
            "rollout.prompts_per_step=1",
            "rollout.samples_per_prompt=4",
            "train.micro_batch_size_per_device=4",
            f"kl.coef={BETA}",
            "kl.in_reward=true",
            "kl.estimator=k1",
            f"ppo.gamma={GAMMA}",
            f"ppo.lam={LAM}",
            f"train.output_dir={tmp_path}",
            *extra,
        ],
    )


def test_ppo_is_an_episode_algorithm_and_dpo_is_not(tmp_path, tiny_model_dir):
    assert _cfg(tmp_path, tiny_model_dir).train.algorithm == "ppo"
    with pytest.raises(ConfigError, match=r"env\.name='calculator' needs train\.algorithm in"):
        load_config(None, ["env.name=calculator", "data.source=env", "train.algorithm=dpo"])


def _sampled_gae(r: list[float], v: list[float]) -> list[float]:
    """GAE along one episode's sampled tokens (Python floats), V = 0 after the last."""
    out, running, v = [0.0] * len(r), 0.0, [*v, 0.0]
    for k in reversed(range(len(r))):
        running = r[k] + GAMMA * v[k + 1] - v[k] + GAMMA * LAM * running
        out[k] = running
    return out


@pytest.fixture(scope="module")
def step(tiny_model_dir, tmp_path_factory):
    """One PPO batch over the scripted episodes with a random critic head and a perturbed
    reference (so values and KL are far from 0); the model, algorithm and samples."""
    tmp = tmp_path_factory.mktemp("ppo-episodes")
    cfg = _cfg(tmp, tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    model = load_actor_critic(str(tiny_model_dir), cfg=cfg).eval()
    torch.nn.init.normal_(model.critic.score.weight, std=0.5)
    ref = load_policy(tiny_model_dir).eval()
    with torch.no_grad():
        ref.lm_head.weight.add_(0.05 * torch.randn_like(ref.lm_head.weight))
    factory = environment_factory("calculator")
    source = EpisodeSource(cfg, tok, ScriptedEngine(tok, SCRIPTS), [ROW], [ROW], factory)
    algo = PPO(cfg, source, ref)
    batch = algo.make_batch(0, model)
    source.engine.calls = 0  # the same episodes again, to read their samples
    (group,), _ = source.collect_groups(1)
    return SimpleNamespace(model=model, algo=algo, batch=batch, group=group)


def test_advantages_are_gae_over_the_sampled_tokens(step):
    (mb,) = step.batch.micro_batches
    assert sorted(s.reward for s in step.group) == [0.0, 0.0, 1.0, 1.0]
    raw: list[tuple[int, list[int], list[float]]] = []  # row, sampled positions, unwhitened A
    n_obs = 0
    for i in range(mb["input_ids"].shape[0]):
        length = int(mb["attention_mask"][i].sum())
        ids = mb["input_ids"][i, :length].tolist()
        s = next(s for s in step.group if s.rollout.prompt_ids + s.rollout.completion_ids == ids)
        start = len(s.rollout.prompt_ids) - 1
        cm = s.rollout.completion_mask
        sampled = [start + k for k, m in enumerate(cm) if m]
        obs = [start + k for k, m in enumerate(cm) if not m]
        n_obs += len(obs)
        assert mb["mask"][i].nonzero().flatten().tolist() == sampled
        kl = [float(mb["logp_old"][i, j] - mb["logp_ref"][i, j]) for j in sampled]
        r = [-BETA * x for x in kl]
        r[-1] += s.reward
        v = [float(mb["values_old"][i, j]) for j in sampled]
        adv = _sampled_gae(r, v)
        ret = [a + b for a, b in zip(adv, v, strict=True)]
        assert mb["returns"][i, sampled].tolist() == pytest.approx(ret, abs=1e-5)
        raw.append((i, sampled, adv))
        assert (mb["adv"][i, obs] == 0).all() and (mb["returns"][i, obs] == 0).all()
    assert n_obs > 0 and any(len(x[1]) > 5 for x in raw)
    # the critic and the KL are live: values differ from 0, and so do the KL terms
    assert float(mb["values_old"][mb["mask"].bool()].abs().min()) > 0
    assert float((mb["logp_old"] - mb["logp_ref"])[mb["mask"].bool()].abs().max()) > 1e-3
    flat = [a for _, _, adv in raw for a in adv]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((a - mean) ** 2 for a in flat) / (len(flat) - 1) + 1e-8)
    for i, sampled, adv in raw:
        expected = [(a - mean) / std for a in adv]
        assert mb["adv"][i, sampled].tolist() == pytest.approx(expected, abs=1e-4)


def test_observation_tokens_never_reach_the_policy_or_value_loss(step):
    (mb,) = step.batch.micro_batches
    with torch.no_grad():
        out = step.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
    loss, shares = step.algo.loss(out, mb, step.batch)
    assert torch.isfinite(loss) and shares["value/loss"] > 0
    off = torch.zeros_like(mb["input_ids"], dtype=torch.bool)
    off[:, :-1] = ~mb["mask"].bool()  # positions predicting a prompt / observation / pad token
    g = torch.Generator().manual_seed(1)
    noisy_values = torch.where(
        off, out.values + 10 * torch.randn(off.shape, generator=g), out.values
    )
    noise = 10 * torch.randn(out.logits.shape, generator=g)
    noisy_logits = torch.where(off[..., None], out.logits + noise, out.logits)
    loss2, shares2 = step.algo.loss(
        SimpleNamespace(values=noisy_values, logits=noisy_logits), mb, step.batch
    )
    assert float(loss2) == float(loss) and shares2 == shares
    # the same noise on the sampled positions does change it
    on = torch.zeros_like(off)
    on[:, :-1] = mb["mask"].bool()
    loss3, _ = step.algo.loss(
        SimpleNamespace(values=torch.where(on, out.values + 1.0, out.values), logits=out.logits),
        mb,
        step.batch,
    )
    assert abs(float(loss3) - float(loss)) > 1e-4


def test_ppo_run_on_calculator_episodes_with_the_hf_engine(tiny_model_dir, tmp_path):
    from posttrain.trainer import Trainer

    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"train.output_dir={tmp_path}",
            "train.algorithm=ppo",
            "advantage.estimator=gae",
            "env.name=calculator",
            "data.source=env",
            "data.train_size=16",
            "data.eval_size=4",
            "env.max_turns=3",
            "env.max_episode_tokens=160",
            "rollout.engine=hf",
            "rollout.max_new_tokens=24",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=2",
            "train.micro_batch_size_per_device=8",
            "train.steps=2",
            "train.eval_every=0",
            "eval.num_problems=0",
            "kl.coef=0.05",
            "kl.in_reward=true",
            "log.wandb=disabled",
            "log.progress=false",
        ],
    )
    history = Trainer(cfg).train()
    assert len(history) == 2
    for m in history:
        for key in ("loss", "policy/loss", "value/loss", "value/explained_var"):
            assert math.isfinite(m[key]), key
        ends = sum(v for k, v in m.items() if k.startswith("agent/end/"))
        assert ends == 4 * 2  # every episode of the step ended, with a reason
    assert history[-1]["weight_version"] == 2.0
