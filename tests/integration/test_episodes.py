"""Multi-turn episodes: token-exact ids and loss masks, template checks, faulty environments, and
the trainer's log-probs of a vLLM-sampled multi-turn episode equal to vLLM's."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch

from posttrain.algorithms.grpo import GRPO
from posttrain.config import load_config
from posttrain.envs import environment_factory
from posttrain.envs.base import StepResult, Turn
from posttrain.errors import ConfigError, RolloutError
from posttrain.models import load_policy, load_tokenizer
from posttrain.rollout.engine import Rollout
from posttrain.rollout.episode_source import EpisodeSource
from posttrain.rollout.episodes import (
    EpisodeLimits,
    TemplateError,
    episode_metrics,
    run_episodes,
)
from posttrain.rollout.source import step_sampling

ROW = {"prompt": "What is 123 * 456?", "answer": "56088"}
MUL = '<tool_call>\n{"name": "multiply", "arguments": {"a": 123, "b": 456}}\n</tool_call>'
ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 56088, "b": 0}}\n</tool_call>'
# episode scripts: each assistant turn's text, in order (the last one answers without a tool)
SCRIPTS = [[MUL, ADD, "56088"], ["1"], [MUL, "7"], [MUL, ADD, "56088"]]


@dataclass
class ScriptedEngine:
    """Plays fixed assistant turns (ids of the text + the end-of-turn token), with known
    log-probs: a stand-in for sampling where the test must choose the tokens."""

    tokenizer: Any
    scripts: list[list[list[int]]]
    weight_version: int = 0
    alive: list[int] = field(default_factory=list)
    calls: int = 0

    def generate(self, prompt_ids: list[list[int]], sampling: Any) -> list[Rollout]:
        if self.calls == 0:
            self.alive = list(range(len(self.scripts)))
        assert len(prompt_ids) == len(self.alive) and sampling.n == 1
        out = []
        for i, (ep, ctx) in enumerate(zip(self.alive, prompt_ids, strict=True)):
            ids = self.scripts[ep][self.calls]
            logprobs = [-0.01 * (self.calls + 1) * (k + 1) for k in range(len(ids))]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            out.append(Rollout(i, ctx, ids, logprobs, text, "stop", self.weight_version))
        self.calls += 1
        self.alive = [ep for ep in self.alive if len(self.scripts[ep]) > self.calls]
        return out

    def load_weights(self, named_tensors: Any, version: int) -> float:
        self.weight_version = version
        return 0.0


def _turn_ids(tok: Any, text: str) -> list[int]:
    return [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _cfg(tmp_path, *extra: str):
    return load_config(
        None,
        [
            "env.name=calculator",
            "data.source=env",
            "rollout.prompts_per_step=1",
            "rollout.samples_per_prompt=4",
            "train.micro_batch_size_per_device=4",
            f"train.output_dir={tmp_path}",
            *extra,
        ],
    )


def test_three_turn_episode_ids_mask_logprobs_and_advantages(tok, tmp_path):
    cfg = _cfg(tmp_path)
    scripts = [[_turn_ids(tok, t) for t in s] for s in SCRIPTS]
    engine = ScriptedEngine(tok, scripts)
    source = EpisodeSource(cfg, tok, engine, [ROW], [ROW], environment_factory("calculator"))
    groups, metrics = source.collect_groups(0)
    (group,) = groups
    assert [s.reward for s in group] == [1.0, 0.0, 0.0, 1.0]
    assert metrics["agent/turns_mean"] == (3 + 1 + 2 + 3) / 4
    assert metrics["agent/tool_calls/ok"] == 2 + 0 + 1 + 2
    assert metrics["agent/end/done"] == 4.0

    # The ids are prompt, turn 1, observation 1, turn 2, observation 2, turn 3, built by hand:
    # the tool's answer rendered by the chat template between the end of a turn and the next
    # assistant header. For this tokenizer that is also the whole conversation re-rendered.
    ep = group[0].rollout
    obs = "\n<|im_start|>tool\n56088<|im_end|>\n<|im_start|>assistant\n"
    o = tok(obs, add_special_tokens=False)["input_ids"]
    t1, t2, t3 = scripts[0]
    assert ep.completion_ids == [*t1, *o, *t2, *o, *t3]
    assert ep.completion_mask == [1] * len(t1) + [0] * len(o) + [1] * len(t2) + [0] * len(o) + [
        1
    ] * len(t3)
    lp = [[-0.01 * (k + 1) * (j + 1) for j in range(len(t))] for k, t in enumerate((t1, t2, t3))]
    assert ep.logprobs == [*lp[0], *[0.0] * len(o), *lp[1], *[0.0] * len(o), *lp[2]]
    messages = [{"role": "user", "content": ROW["prompt"]}]
    for text in (MUL, ADD):
        messages += [{"role": "assistant", "content": text}, {"role": "tool", "content": "56088"}]
    messages.append({"role": "assistant", "content": "56088"})
    tools = source.env_factory().tools
    full = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert (
        ep.prompt_ids + ep.completion_ids == tok(full[:-1], add_special_tokens=False)["input_ids"]
    )

    # GRPO: rewards [1, 0, 0, 1] -> advantages +-0.5 / std (sample std sqrt(1/3)) on the
    # sampled tokens of each episode; observation tokens carry mask 0.
    engine.calls = 0  # the same episodes again, as step 1's batch
    batch = GRPO(cfg, source, None).make_batch(1, None)
    (mb,) = batch.micro_batches
    expected = 0.5 / (1 / 3) ** 0.5
    for i in range(4):
        ids = mb["input_ids"][i].tolist()
        length = int(mb["attention_mask"][i].sum())
        s = next(
            s for s in group if s.rollout.prompt_ids + s.rollout.completion_ids == ids[:length]
        )
        start = len(s.rollout.prompt_ids) - 1
        mask = mb["mask"][i, start : start + len(s.rollout.completion_ids)].tolist()
        assert mask == [float(m) for m in s.rollout.completion_mask]
        assert mb["mask"][i, :start].sum() == 0 and mb["mask"][i, length - 1 :].sum() == 0
        sign = 1.0 if s.reward == 1.0 else -1.0
        adv = mb["adv"][i, start : start + len(mask)]
        assert torch.allclose(adv, torch.full_like(adv, sign * expected), atol=1e-5)


def test_sampled_ids_are_kept_where_decode_then_encode_would_change_them(tok, tmp_path):
    # The model "types" the characters of <|im_end|> before its answer: decoded and encoded again
    # they would become the one special token. The episode keeps exactly the sampled ids.
    typed = [tok.convert_tokens_to_ids(c) for c in "<|im_end|>"]
    final = [*typed, *_turn_ids(tok, "56088")]
    assert tok(tok.decode(final), add_special_tokens=False)["input_ids"] != final  # drift exists
    scripts = [[_turn_ids(tok, MUL), final]]
    eps = run_episodes(
        [ROW],
        environment_factory("calculator"),
        ScriptedEngine(tok, scripts),
        tok,
        step_sampling(_cfg(tmp_path), 0),
        EpisodeLimits(max_turns=3, max_episode_tokens=400, max_new_tokens=80),
    )
    (ep,) = eps
    assert ep.end == "done" and ep.ids[-len(final) :] == final
    assert ep.mask[-len(final) :] == [1] * len(final)


# drops the content of every assistant turn but the last (even the fixed base's ".")
CONTENT_DROPPING = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] != 'assistant' or loop.last %}{{- m['content'] }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize(
    ("render", "message"),
    [("full", "assistant turn 0"), ("fixed_base", "fixed_base: at assistant turn 0")],
)
def test_a_template_that_rewrites_earlier_turns_is_refused(tok, tmp_path, render, message):
    bad = load_tokenizer(tok.name_or_path)
    bad.chat_template = CONTENT_DROPPING
    engine = ScriptedEngine(bad, [[_turn_ids(bad, MUL), _turn_ids(bad, "56088")]])
    with pytest.raises(TemplateError, match=message):
        run_episodes(
            [ROW],
            environment_factory("calculator"),
            engine,
            bad,
            step_sampling(_cfg(tmp_path), 0),
            EpisodeLimits(max_new_tokens=80, observation_render=render),
        )


# Qwen3-style: an earlier assistant turn is rendered without its <think> block
THINK_DROPPING = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' and not loop.last %}"
    "{{- m['content'].split('</think>')[-1] }}{%- else %}{{- m['content'] }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_think_dropping_template_is_refused_then_played_with_the_fixed_base(tok, tmp_path):
    qwen3ish = load_tokenizer(tok.name_or_path)
    qwen3ish.chat_template = THINK_DROPPING
    turns = [_turn_ids(qwen3ish, "<think>use the tool</think>" + MUL), _turn_ids(qwen3ish, "56088")]

    def play(render: str) -> list:
        return run_episodes(
            [ROW],
            environment_factory("calculator"),
            ScriptedEngine(qwen3ish, [turns]),
            qwen3ish,
            step_sampling(_cfg(tmp_path), 0),
            EpisodeLimits(max_new_tokens=80, observation_render=render),
        )

    with pytest.raises(TemplateError, match="assistant turn 0"):
        play("full")
    (ep,) = play("fixed_base")
    # the tool message as this template renders it after a closed assistant turn, by hand
    obs = qwen3ish(
        "\n<|im_start|>tool\n56088<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )["input_ids"]
    assert ep.end == "done" and ep.env.final_reward() == 1.0
    assert ep.ids == [*turns[0], *obs, *turns[1]]
    assert ep.mask == [1] * len(turns[0]) + [0] * len(obs) + [1] * len(turns[1])
    # what the model saw keeps the <think> block the full re-render would drop
    seen = qwen3ish.decode(ep.prompt_ids + ep.ids, skip_special_tokens=False)
    assert "<think>use the tool</think>" in seen


def test_observation_render_choices_are_the_rollout_layers():
    from posttrain.config import CHOICES
    from posttrain.rollout.episodes import OBSERVATION_RENDERS

    assert CHOICES["env.observation_render"] == OBSERVATION_RENDERS
    with pytest.raises(ConfigError, match=r"env\.observation_render: 'fixed' is not one of"):
        load_config(None, ["env.observation_render=fixed"])
    with pytest.raises(ConfigError, match=r"rollout\.kv_block_size=20: use a multiple of 16"):
        load_config(None, ["rollout.kv_block_size=20"])
    assert load_config(None, ["rollout.kv_block_size=32"]).rollout.kv_block_size == 32


class RaisingEnv:
    tools: ClassVar[list] = []

    def reset(self, row: dict) -> list[dict]:
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, turn: Turn) -> StepResult:
        raise RuntimeError("environment bug")

    def final_reward(self) -> float | None:
        return 1.0


class HangingEnv(RaisingEnv):
    def step(self, turn: Turn) -> StepResult:
        time.sleep(30)
        return StepResult(done=True)


@pytest.mark.parametrize(
    ("env_cls", "end"), [(RaisingEnv, "env_error"), (HangingEnv, "env_timeout")]
)
def test_an_environment_that_raises_or_hangs_masks_its_episode(tok, tmp_path, env_cls, end):
    cfg = _cfg(tmp_path, "env.step_timeout_s=0.5")
    engine = ScriptedEngine(tok, [[_turn_ids(tok, "12")]] * 4)
    source = EpisodeSource(cfg, tok, engine, [ROW], [ROW], env_cls)
    t0 = time.monotonic()
    (group,), metrics = source.collect_groups(0)
    assert time.monotonic() - t0 < 10  # a hung environment costs its timeout, not the run
    assert [s.reward for s in group] == [None] * 4 and not any(s.valid for s in group)
    assert metrics[f"agent/end/{end}"] == 4.0 and metrics["samples/reward_none"] == 4.0


@dataclass
class CalculatingEngine:
    """Calls `multiply` first, then answers with the tool's result: the same policy at every
    temperature. Records each call's prompt count and temperature."""

    tokenizer: Any
    weight_version: int = 0
    calls: list = field(default_factory=list)

    def generate(self, prompt_ids: list[list[int]], sampling: Any) -> list[Rollout]:
        self.calls.append((len(prompt_ids), sampling.temperature))
        out = []
        for i, ctx in enumerate(prompt_ids):
            seen = self.tokenizer.decode(ctx, skip_special_tokens=False)
            text = seen.rsplit("tool\n", 1)[1].split("<|im_end|>")[0] if "tool\n" in seen else MUL
            ids = _turn_ids(self.tokenizer, text)
            out.append(Rollout(i, ctx, ids, [-0.1] * len(ids), text, "stop", 0))
        return out


def test_evaluation_reports_greedy_and_sampled_success(tok, tmp_path):
    cfg = _cfg(tmp_path, "eval.k=3", "eval.temperature=0.7")
    wrong = {**ROW, "answer": "1"}  # the tool's product never equals it
    engine = CalculatingEngine(tok)
    source = EpisodeSource(cfg, tok, engine, [ROW], [ROW, wrong], environment_factory("calculator"))
    out = source.evaluate()
    # greedy: 2 tasks x 2 turns, then sampled: 3 episodes per task x 2 turns
    assert engine.calls == [(2, 0.0), (2, 0.0), (6, 0.7), (6, 0.7)]
    assert out["eval/greedy_acc"] == 0.5 and out["eval/turns_mean"] == 2.0
    assert out["eval/avg@3"] == 0.5 and out["eval/pass@3"] == 0.5
    assert out["eval/sampled_turns_mean"] == 2.0


class SleepyEnv(RaisingEnv):
    def step(self, turn: Turn) -> StepResult:
        time.sleep(0.3)
        return StepResult(done=True)


def test_environment_time_is_wall_time_not_the_sum_over_concurrent_episodes(tok, tmp_path):
    cfg = _cfg(tmp_path, "rollout.samples_per_prompt=8", "train.micro_batch_size_per_device=8")
    source = EpisodeSource(cfg, tok, CalculatingEngine(tok), [ROW], [ROW], SleepyEnv)
    _, m = source.collect_groups(0)
    assert m["agent/env_seconds"] >= 8 * 0.3  # summed over the 8 episodes
    assert 0.3 <= m["time/env_s"] < 8 * 0.3 / 2  # they answered concurrently
    assert m["time/generate_s"] >= 0.0


class UnscoredEnv(RaisingEnv):
    """Ends after one turn and leaves the scoring to the configured `rewards`."""

    def step(self, turn: Turn) -> StepResult:
        return StepResult(done=True)

    def final_reward(self) -> float | None:
        return None


def test_the_configured_rewards_score_what_the_environment_does_not(tok, tmp_path):
    # final_reward() None: the `rewards` (exact_answer on the final turn) score the episode
    cfg = _cfg(tmp_path)
    turns = [[_turn_ids(tok, "56088")], [_turn_ids(tok, "7")]] * 2
    source = EpisodeSource(cfg, tok, ScriptedEngine(tok, turns), [ROW], [ROW], UnscoredEnv)
    (group,), _ = source.collect_groups(0)
    assert [s.reward for s in group] == [1.0, 0.0, 1.0, 0.0]
    # an environment run may leave `rewards` empty, but then every episode needs a final reward
    cfg = _cfg(tmp_path, "rewards=[]")
    source = EpisodeSource(cfg, tok, ScriptedEngine(tok, turns), [ROW], [ROW], UnscoredEnv)
    with pytest.raises(RolloutError, match=r"final_reward\(\) returned None .* `rewards` is empty"):
        source.collect_groups(0)
    with pytest.raises(ConfigError, match="GRPO needs at least one reward"):
        load_config(None, ["rewards=[]"])  # single-turn prompts always need a reward


def test_episode_metrics_count_outcomes_and_observation_tokens(tok, tmp_path):
    scripts = [[_turn_ids(tok, t) for t in s] for s in SCRIPTS]
    eps = run_episodes(
        [ROW] * 4,
        environment_factory("calculator"),
        ScriptedEngine(tok, scripts),
        tok,
        step_sampling(_cfg(tmp_path), 0),
        EpisodeLimits(max_new_tokens=80),
    )
    m = episode_metrics(eps)
    observed = sum(len(e.mask) - sum(e.mask) for e in eps)
    assert m["agent/observation_token_frac"] == pytest.approx(
        observed / sum(len(e.mask) for e in eps)
    )
    assert m["agent/turn_length_mean"] == pytest.approx(
        sum(sum(e.turn_lengths) for e in eps) / sum(len(e.turn_lengths) for e in eps)
    )
    assert m["agent/tool_calls/valid_frac"] == 1.0
    for ep in eps:  # no tool calls at all (an environment without tools): no share reported
        ep.tool_outcomes = []
    assert "agent/tool_calls/valid_frac" not in episode_metrics(eps)


@pytest.mark.slow
@pytest.mark.parametrize("block", [None, 32])
def test_trainer_logprobs_of_a_vllm_multi_turn_episode_equal_vllms(
    tiny_model_dir, tok, tmp_path, block
):
    """guess_number answers every turn, so a random model plays several turns; the trainer's
    log-probs of the sampled tokens (after the observations) equal the engine's, with vLLM's
    prefix cache on (its default) and with 32-token KV blocks (`rollout.kv_block_size`)."""
    from posttrain.models.forward import policy_token_stats
    from posttrain.rollout import make_engine

    kw = {} if block is None else {"block_size": block}
    engine = make_engine(
        "vllm", str(tiny_model_dir), max_model_len=512, seed=0, kv_cache_gib=0.25, **kw
    )
    cache = engine.llm.llm_engine.vllm_config.cache_config
    assert cache.enable_prefix_caching and cache.block_size == (block or cache.block_size)
    cfg = _cfg(tmp_path, "env.name=guess_number")
    eps = run_episodes(
        _guess_rows(),
        environment_factory("guess_number", {"max_guesses": 3}),
        engine,
        tok,
        step_sampling(cfg, 0),
        EpisodeLimits(max_turns=3, max_episode_tokens=400, max_new_tokens=64),
    )
    assert max(len(e.turn_lengths) for e in eps) >= 2  # multi-turn, with observations between
    model = load_policy(tiny_model_dir)
    for ep in eps:
        ids = torch.tensor([ep.prompt_ids + ep.ids])
        t = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        logp = policy_token_stats(model, t, 1.0, 1)["logp_old"][0, len(ep.prompt_ids) - 1 :]
        sampled = torch.tensor(ep.mask, dtype=torch.bool)
        diff = (logp[sampled] - torch.tensor(ep.logprobs)[sampled]).abs().max()
        assert diff < 1e-4, diff
        assert all(v == 0.0 for v, m in zip(ep.logprobs, ep.mask, strict=True) if m == 0)


def _guess_rows() -> list[dict]:
    from posttrain.envs.guess_number import make_rows

    rows = make_rows(4, seed=0, split="train")
    return [row for row in rows for _ in range(4)]


def test_transcripts_json_roundtrip(tok, tmp_path):
    cfg = _cfg(tmp_path, "eval.num_problems=1")
    engine = CalculatingEngine(tok)
    source = EpisodeSource(cfg, tok, engine, [ROW], [ROW], environment_factory("calculator"))
    out = source.evaluate()
    assert out["eval/greedy_acc"] == 1.0 and out["eval/turns_mean"] == 2.0
    doc = json.loads((tmp_path / "transcripts" / "eval-001.json").read_text())
    assert doc[0]["reward"] == 1.0 and doc[0]["messages"][-1]["content"] == "56088"


# every environment recipe, and the first words of its tasks
ENV_RECIPES = {
    "calculator_tiny": "What is ",
    "calculator_expression_tiny": "What is ",
    "calculator_loop": "What is ",
    "guess_number_tiny": "Guess my number",
    "code_feedback_tiny": "Write a Python function",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ENV_RECIPES))
def test_environment_recipe_short_run(tiny_model_dir, tmp_path, name):
    """Each environment recipe end to end for a few steps: SFT warm-up on the environment's
    transcripts, GRPO on episodes with in-process vLLM, eval transcripts on disk."""
    from pathlib import Path

    from posttrain.trainer import Trainer

    recipe = Path(__file__).resolve().parents[2] / "recipes" / f"{name}.yaml"
    cfg = load_config(
        recipe,
        [
            f"model.path={tiny_model_dir}",
            f"train.output_dir={tmp_path}",
            "warmup.steps=3",
            "warmup.batch_size=8",
            "train.steps=2",
            "train.eval_every=0",
            "rollout.prompts_per_step=2",
            "rollout.samples_per_prompt=4",
            "train.micro_batch_size_per_device=8",
            "data.train_size=64",
            "eval.num_problems=4",
            "log.wandb=disabled",
        ],
    )
    history = Trainer(cfg).train()
    assert len(history) == 2
    assert history[-1]["weight_version"] == 2.0  # one sync per step
    for m in history:
        ends = sum(v for k, v in m.items() if k.startswith("agent/end/"))
        assert ends == 2 * 4  # every episode ended, with a reason
        assert 0.0 <= m["agent/observation_token_frac"] < 1.0
    warm = [json.loads(line) for line in (tmp_path / "sft-warmup" / "metrics.jsonl").open()]
    assert len([r for r in warm if "loss" in r]) == 3
    transcripts = sorted((tmp_path / "transcripts").glob("eval-*.json"))
    assert len(transcripts) == 2  # before and after training
    doc = json.loads(transcripts[-1].read_text())
    assert doc and doc[0]["messages"][0]["content"].startswith(ENV_RECIPES[name])
