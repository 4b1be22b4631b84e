"""Per-turn credit on real episodes: GRPO's batch of scripted guess_number episodes carries each
turn's hand-computed advantage on that turn's sampled tokens (return_to_go and progress), equals
the episode-level batch when gamma = 1, and a short GRPO run with the hf engine trains on it."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from posttrain.algorithms.grpo import GRPO
from posttrain.config import load_config
from posttrain.envs import StepResult, Turn, environment_factory
from posttrain.envs.guess_number import GuessNumberEnv
from posttrain.models import load_tokenizer
from posttrain.rollout.engine import Rollout
from posttrain.rollout.episode_source import EpisodeSource

EPS = 1e-6
ROW = {"prompt": "Guess my number from 1 to 16.", "secret": 11, "high": 16}
# each episode's guesses; turn_cost 0.1: F = 1 - 0.1 (guesses - 1) when found, else 0
SCRIPTS = [["8", "12", "11"], ["11"], ["3", "5", "7"], ["10", "11"]]
FINAL = [0.8, 1.0, 0.0, 0.9]


@dataclass
class ScriptedEngine:
    """Plays fixed assistant turns (the text's ids + the end-of-turn id): the test chooses the
    guesses, the real environment, tokenizer and GRPO do the rest."""

    tokenizer: Any
    scripts: list[list[str]]
    weight_version: int = 0
    alive: list[int] = field(default_factory=list)
    calls: int = 0

    def ids(self, text: str) -> list[int]:
        return [
            *self.tokenizer(text, add_special_tokens=False)["input_ids"],
            self.tokenizer.eos_token_id,
        ]

    def generate(self, prompt_ids: list[list[int]], sampling: Any) -> list[Rollout]:
        if self.calls == 0:
            self.alive = list(range(len(self.scripts)))
        out = []
        for i, (ep, ctx) in enumerate(zip(self.alive, prompt_ids, strict=True)):
            ids = self.ids(self.scripts[ep][self.calls])
            out.append(
                Rollout(i, ctx, ids, [-0.5] * len(ids), self.scripts[ep][self.calls], "stop", 0)
            )
        self.calls += 1
        self.alive = [ep for ep in self.alive if len(self.scripts[ep]) > self.calls]
        return out

    def load_weights(self, named_tensors: Any, version: int) -> float:
        return 0.0


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _batch(tok, tmp_path, *extra: str, model: Any = None) -> dict[str, torch.Tensor]:
    cfg = load_config(
        None,
        [
            "env.name=guess_number",
            "env.kwargs={turn_cost: 0.1, max_guesses: 3}",
            "env.max_turns=3",
            "data.source=env",
            "rollout.prompts_per_step=1",
            "rollout.samples_per_prompt=4",
            "train.micro_batch_size_per_device=4",
            f"train.output_dir={tmp_path}",
            *extra,
        ],
    )
    factory = environment_factory("guess_number", {"turn_cost": 0.1, "max_guesses": 3})
    source = EpisodeSource(cfg, tok, ScriptedEngine(tok, SCRIPTS), [ROW], [ROW], factory)
    (mb,) = GRPO(cfg, source, None).make_batch(0, model).micro_batches
    return mb


def _sampled_advantages(mb: dict[str, torch.Tensor], tok) -> list[list[float]]:
    """Per episode of SCRIPTS, the advantages on its sampled tokens, in order."""
    engine = ScriptedEngine(tok, SCRIPTS)
    out = []
    for script in SCRIPTS:
        sampled = [i for text in script for i in engine.ids(text)]
        for row in range(mb["input_ids"].shape[0]):
            m = mb["mask"][row].bool()
            if mb["input_ids"][row, 1:][m].tolist() == sampled:
                out.append(mb["adv"][row][m].tolist())
                break
    assert len(out) == len(SCRIPTS)
    return out


def _expected(tok, turn_adv: list[list[float]]) -> list[list[float]]:
    engine = ScriptedEngine(tok, SCRIPTS)
    return [
        [a for text, a in zip(script, adv, strict=True) for _ in engine.ids(text)]
        for script, adv in zip(SCRIPTS, turn_adv, strict=True)
    ]


def _grpo(returns: list[list[float]]) -> list[list[float]]:
    g0 = [g[0] for g in returns]
    mu, sd = statistics.fmean(g0), statistics.stdev(g0)
    return [[(x - mu) / (sd + EPS) for x in g] for g in returns]


def test_return_to_go_advantages_on_each_turns_tokens(tok, tmp_path):
    mb = _batch(tok, tmp_path, "advantage.credit=return_to_go", "advantage.turn_discount=0.5")
    # no turn rewards: G_k = 0.5^(n - 1 - k) F
    returns = [[0.2, 0.4, 0.8], [1.0], [0.0, 0.0, 0.0], [0.45, 0.9]]
    got = _sampled_advantages(mb, tok)
    for g, e in zip(got, _expected(tok, _grpo(returns)), strict=True):
        assert g == pytest.approx(e, abs=1e-5)


def _p(n_left: int) -> float:
    return 1 - math.log(n_left + 1) / math.log(17)


def test_progress_advantages_on_each_turns_tokens(tok, tmp_path):
    mb = _batch(tok, tmp_path, "advantage.credit=progress")
    # secret 11: "8" leaves [9, 16] (8 numbers), "12" then [9, 11] (3), "10" leaves [11, 16] (6).
    # gamma = 1: G_k = F (1 - p_{k-1}), p_{-1} = 0
    returns = [
        [0.8, 0.8 * (1 - _p(8)), 0.8 * (1 - _p(3))],
        [1.0],
        [0.0, 0.0, 0.0],
        [0.9, 0.9 * (1 - _p(6))],
    ]
    got = _sampled_advantages(mb, tok)
    for g, e in zip(got, _expected(tok, _grpo(returns)), strict=True):
        assert g == pytest.approx(e, abs=1e-5)


def test_gamma_one_return_to_go_batch_equals_the_episode_batch(tok, tmp_path):
    episode = _batch(tok, tmp_path)
    rtg = _batch(tok, tmp_path, "advantage.credit=return_to_go")
    assert set(episode) == set(rtg)
    for key in episode:
        assert torch.equal(episode[key], rtg[key]), key
    assert episode["adv"].abs().sum() > 0


def test_turn_level_entropy_modulation_scales_each_turn_by_its_mean_entropy(
    tok, tmp_path, tiny_model_dir
):
    from posttrain.models import load_policy

    model = load_policy(tiny_model_dir)
    plain = _batch(tok, tmp_path, "advantage.credit=return_to_go", "advantage.turn_discount=0.5")
    em = ("advantage.entropy_modulation=2.0", "advantage.entropy_modulation_level=turn")
    mb = _batch(
        tok,
        tmp_path,
        "advantage.credit=return_to_go",
        "advantage.turn_discount=0.5",
        *em,
        model=model,
    )
    base = _sampled_advantages(plain, tok)
    got = _sampled_advantages(mb, tok)
    # the model's own token entropies of each episode's sampled tokens, split by turn
    engine, weights = ScriptedEngine(tok, SCRIPTS), []
    for row in range(mb["input_ids"].shape[0]):
        m = mb["mask"][row].bool()
        ids = mb["input_ids"][row : row + 1]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mb["attention_mask"][row : row + 1]).logits
        logp = torch.log_softmax(logits[0, :-1].double(), -1)
        ent = (-(logp.exp() * logp).sum(-1))[m].tolist()
        sampled = mb["input_ids"][row, 1:][m].tolist()
        script = next(s for s in SCRIPTS if [i for t in s for i in engine.ids(t)] == sampled)
        start = 0
        for text in script:
            n = len(engine.ids(text))
            weights.append(
                (SCRIPTS.index(script), math.exp(-2.0 * statistics.fmean(ent[start : start + n])))
            )
            start += n
    mean = statistics.fmean(w for _, w in weights)
    for e, script in enumerate(SCRIPTS):
        turn_w = [w / mean for i, w in weights if i == e]
        expected_ratio = [
            w for text, w in zip(script, turn_w, strict=True) for _ in engine.ids(text)
        ]
        ratio = [g / b for g, b in zip(got[e], base[e], strict=True)]
        assert ratio == pytest.approx(expected_ratio, rel=1e-4)


class PricedGuessNumber(GuessNumberEnv):
    """guess_number whose every guess costs 0.001 per character: per-turn rewards that differ
    between the episodes of a random model, so the groups are never flat."""

    def step(self, turn: Turn) -> StepResult:
        result = super().step(turn)
        result.reward = -0.001 * len(turn.text)
        return result


def test_grpo_run_with_return_to_go_on_the_tiny_model(tiny_model_dir, tmp_path):
    from posttrain.trainer import Trainer

    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"train.output_dir={tmp_path}",
            f"env.name={__name__}:PricedGuessNumber",
            "data.source=env",
            "data.train_size=16",
            "data.eval_size=4",
            "env.max_turns=3",
            "env.max_episode_tokens=200",
            "rollout.engine=hf",
            "rollout.max_new_tokens=32",
            "rollout.prompts_per_step=2",
            "rollout.samples_per_prompt=4",
            "train.micro_batch_size_per_device=8",
            "train.steps=2",
            "train.eval_every=0",
            "eval.num_problems=0",
            "advantage.credit=return_to_go",
            "advantage.turn_discount=0.9",
            "rewards=[{name: length_in_range, kwargs: {max_chars: 5}}]",
            "log.wandb=disabled",
            "log.progress=false",
        ],
    )
    history = Trainer(cfg).train()
    assert len(history) == 2
    assert max(m["agent/turns_max"] for m in history) >= 2  # multi-turn episodes
    for m in history:
        assert m["advantage/turn_abs_mean"] > 0 and math.isfinite(m["loss"])
