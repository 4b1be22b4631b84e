"""Guide (adaptive guidance): the pure functions against hand values and loops, the config
checks, the Guide round with a fake engine, and the hinted rows' `logp_old` (the hinted-context
log-probs, not the unhinted recompute) on the tiny model without vLLM."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import pytest
import torch

from posttrain import losses, off_policy
from posttrain.config import load_config
from posttrain.config.loading import warmup_config
from posttrain.data.arithmetic import solve
from posttrain.errors import ConfigError
from posttrain.guidance import (
    all_fail_groups,
    answer_first_char,
    arithmetic_tens,
    behaviour_logp_old,
    hinted_prompt,
    realign_completion_logps,
    render_hint,
    replace_samples,
    replacement_slots,
    spread_indices,
    template_fields,
)
from posttrain.rollout.engine import Rollout
from posttrain.rollout.guide import check_hints, guide_groups, guide_metrics, hint_warmup_rows
from posttrain.rollout.source import Sample

NAN = math.nan


# ------------------------------------------------------------------------------ hints
def test_arithmetic_tens_hand_values():
    assert arithmetic_tens({"answer": "52"}) == "the tens digit is 5"
    assert arithmetic_tens({"answer": "98"}) == "the tens digit is 9"
    assert arithmetic_tens({"answer": "105"}) == "the tens digit is 0"
    assert arithmetic_tens({"answer": "7"}) == "the answer has one digit"
    assert arithmetic_tens({"answer": "0"}) == "the answer has one digit"
    assert arithmetic_tens({"answer": "-38"}) == "the answer is negative; the tens digit is 3"
    assert arithmetic_tens({"answer": "-4"}) == "the answer is negative; the answer has one digit"
    with pytest.raises(ValueError, match="integer 'answer' column, got 'x1'"):
        arithmetic_tens({"answer": "x1"})
    with pytest.raises(ValueError, match="got None"):
        arithmetic_tens({"prompt": "1+1"})


def test_answer_first_char_hand_values():
    assert answer_first_char({"answer": " 52"}) == "the answer starts with 5"
    assert answer_first_char({"answer": "-3"}) == "the answer starts with -"
    with pytest.raises(ValueError, match="needs an 'answer' column"):
        answer_first_char({"answer": " "})


def test_hint_template_rendering():
    template = "{prompt}\nHint: {hint}"
    assert (
        render_hint(template, "07+45", "the tens digit is 5") == "07+45\nHint: the tens digit is 5"
    )
    # braces inside the prompt or hint are kept; {{ }} in the template are literal braces
    assert render_hint("{{{hint}}} {prompt}", "\\boxed{}", "a{b}") == "{a{b}} \\boxed{}"
    assert template_fields(template) == ["prompt", "hint"]
    assert template_fields("{{x}} {hint}") == ["hint"]
    with pytest.raises(ValueError):
        template_fields("{prompt")
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2"},
    ]
    out = hinted_prompt(chat, template, "h")
    assert out[:3] == chat[:3] and out[3] == {"role": "user", "content": "2+2\nHint: h"}
    assert chat[3]["content"] == "2+2"  # the row's prompt is not modified
    assert hinted_prompt("5+5", "{hint}: {prompt}", "ten") == "ten: 5+5"
    with pytest.raises(ValueError, match="without a user message"):
        hinted_prompt([{"role": "system", "content": "s"}], template, "h")


# ------------------------------------------------------------------------------ groups
def test_all_fail_groups_hand_values():
    rewards = torch.tensor(
        [
            [0.0, 0.5, 0.0],  # all below 1: fail
            [0.0, 1.0, 0.0],  # one success
            [1.0, 1.1, NAN],  # all valid ones succeed
            [2.0, 0.0, NAN],  # the success is invalid (masked as truncated): fail
            [NAN, NAN, NAN],  # nothing known: fail
        ],
        dtype=torch.float64,
    )
    valid = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert all_fail_groups(rewards, valid, 1.0).tolist() == [True, False, False, True, True]
    assert all_fail_groups(rewards, valid, 0.5).tolist() == [False, False, False, True, True]


def test_all_fail_groups_equals_a_loop_on_every_small_group():
    values = [0.0, 0.9, 1.0, NAN]
    combos = list(itertools.product(values, repeat=2))
    masks = list(itertools.product([True, False], repeat=2))
    rewards = torch.tensor([c for c in combos for _ in masks], dtype=torch.float64)
    valid = torch.tensor([m for _ in combos for m in masks])
    want = [
        not any(v and r >= 1.0 for r, v in zip(rs, vs, strict=True))
        for rs, vs in zip(rewards.tolist(), valid.tolist(), strict=True)
    ]
    assert all_fail_groups(rewards, valid, 1.0).tolist() == want


def test_replacement_slots_hand_values():
    rewards = torch.tensor([[0.0, 0.5, NAN, 0.0], [0.3, 0.2, 0.1, 0.0]], dtype=torch.float64)
    valid = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=torch.bool)
    # invalid first (2), then the lowest rewards, ties by position (0 before 3), then 0.5
    assert replacement_slots(rewards, valid, 4).tolist()[0] == [2, 0, 3, 1]
    assert replacement_slots(rewards, valid, 2).tolist() == [[2, 0], [1, 3]]
    with pytest.raises(ValueError, match="k=5"):
        replacement_slots(rewards, valid, 5)
    with pytest.raises(ValueError, match="k=0"):
        replacement_slots(rewards, valid, 0)


def test_replacement_slots_equal_a_sorted_loop():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (50, 5), generator=gen).double() / 2
    valid = torch.rand(50, 5, generator=gen) > 0.3
    for k in (1, 3, 5):
        got = replacement_slots(rewards, valid, k).tolist()
        for p in range(50):
            key = [
                (0 if valid[p, i] else -1, float(rewards[p, i]) if valid[p, i] else 0.0, i)
                for i in range(5)
            ]
            assert got[p] == [i for *_, i in sorted(key)][:k]


def test_replace_samples():
    assert replace_samples(["a", "b", "c", "d"], ["X", "Y"], [2, 0]) == ["Y", "b", "X", "d"]
    group = [1, 2, 3]
    assert replace_samples(group, [9, 8, 7], [0, 1, 2]) == [9, 8, 7] and group == [1, 2, 3]
    with pytest.raises(ValueError, match="distinct slots"):
        replace_samples(group, [9, 8], [1, 1])
    with pytest.raises(ValueError, match="distinct slots"):
        replace_samples(group, [9], [0, 1])


# ------------------------------------------------------------------------------ log-probs
def test_realign_completion_logps_equals_a_loop():
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(4, 12, generator=gen)
    src_start = torch.tensor([5, 2, 0, 7])
    dst_start = torch.tensor([2, 2, 3, 1])
    lengths = torch.tensor([4, 3, 0, 5])
    got = realign_completion_logps(src, src_start, dst_start, lengths, width=9)
    want = torch.zeros(4, 9)
    for i in range(4):
        for j in range(int(lengths[i])):
            want[i, dst_start[i] + j] = src[i, src_start[i] + j]
    assert torch.equal(got, want)


def test_behaviour_logp_old_takes_the_hinted_context_on_hinted_rows():
    unhinted = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    hinted_ctx = torch.tensor([[-0.1, -0.2], [-0.3, -0.4]])
    out = behaviour_logp_old(unhinted, hinted_ctx, torch.tensor([False, True]))
    assert out.tolist() == [[-1.0, -2.0], [pytest.approx(-0.3), pytest.approx(-0.4)]]


def test_surrogate_ratio_of_a_hinted_row_is_unhinted_over_hinted():
    """pi_theta(y|x) = 0.2, pi_old(y|x,h) = 0.5: r = 0.4. With A = +1 the unclipped branch is
    taken (loss -0.4, gradient kept); with A = -1 the clipped one (loss 0.8, no gradient)."""
    logp = torch.log(torch.tensor([[0.2], [0.2]])).requires_grad_(True)
    unhinted_old = torch.log(torch.tensor([[0.2], [0.2]]))  # the unhinted recompute: r = 1
    hinted_old = torch.log(torch.tensor([[0.5], [0.5]]))
    old = behaviour_logp_old(unhinted_old, hinted_old, torch.tensor([True, True]))
    adv = torch.tensor([[1.0], [-1.0]])
    loss, stats = losses.policy_loss(logp, old, adv, torch.ones(2, 1), clip_low=0.2, clip_high=0.28)
    assert stats["ratio"][:, 0].tolist() == pytest.approx([0.4, 0.4])
    assert loss[:, 0].tolist() == pytest.approx([-0.4, 0.8])
    assert stats["clipped"][:, 0].tolist() == [False, True]
    loss.sum().backward()
    assert logp.grad[:, 0].tolist() == pytest.approx([-0.4, 0.0])  # d(-r A)/d logp = -r A


def test_hinted_rows_context_gap_is_no_engine_mismatch():
    """TIS and the mismatch metrics compare logp_old with the engine's log-probs in the same
    (hinted) context: a hinted row whose logp_old is the hinted-context one has no mismatch,
    while the unhinted recompute would look like a large engine gap."""
    engine_hinted = torch.log(torch.tensor([[0.5, 0.9]]))
    unhinted = torch.log(torch.tensor([[0.05, 0.3]]))
    mask = torch.ones(1, 2)
    old = behaviour_logp_old(unhinted, engine_hinted, torch.tensor([True]))
    w, stats = off_policy.rollout_correction(
        old, engine_hinted, mask, "tis", threshold=2.0, tis_cap=2.0
    )
    assert w.tolist() == [[1.0, 1.0]] and float(stats["mismatch_abs_max"]) == 0.0
    _, wrong = off_policy.rollout_correction(
        unhinted, engine_hinted, mask, "tis", threshold=2.0, tis_cap=2.0
    )
    assert float(wrong["mismatch_abs_max"]) == pytest.approx(math.log(10))


# ------------------------------------------------------------------------------ config
GUIDE_ON = ("guide.enabled=true", "guide.hint_fn=arithmetic_tens")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["guide.hint_fn=arithmetic_ten"],
            r"guide\.hint_fn: 'arithmetic_ten' .*did you mean 'arithmetic_tens'\?",
        ),
        (
            ["guide.hint_fn=zzz"],
            r"guide\.hint_fn: 'zzz' .*use one of arithmetic_tens, answer_first_char",
        ),
        (["guide.hint_template='{prompt} only'"], r"guide\.hint_template=.* has no \{hint\}"),
        (["guide.hint_template='{prompt} {answer} {hint}'"], r"unknown placeholder \{answer\}"),
        (
            ["guide.hint_template='{prompt {hint}'"],
            r"guide\.hint_template=.* is not a valid template",
        ),
        (["guide.replace=0"], r"guide\.replace=0 must be in 1\.\.rollout\.samples_per_prompt=8"),
        (["guide.replace=9"], r"guide\.replace=9 must be in 1\.\.rollout\.samples_per_prompt=8"),
        (["guide.success_threshold=.nan"], r"guide\.success_threshold=nan must be a finite"),
        (["guide.enabled=true", "guide.hint_column=' '"], r"guide\.hint_column is empty"),
        (
            [*GUIDE_ON, "train.algorithm=rebel", "train.micro_batch_size_per_device=8"],
            r"guide\.enabled needs train\.algorithm=grpo",
        ),
        ([*GUIDE_ON, "env.name=calculator"], r"guide\.enabled .* env\.name='calculator'"),
        ([*GUIDE_ON, "advantage.estimator=opo"], r"advantage\.estimator=opo is exactly on-policy"),
        (["guide.warmup_hinted=1.5"], r"guide\.warmup_hinted=1\.5 must be in \[0, 1\]"),
        (
            ["guide.warmup_hinted=0.5", "guide.hint_column=''"],
            r"guide\.warmup_hinted=0\.5 needs hints: guide\.hint_column is empty",
        ),
    ],
)
def test_guide_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_guide_config_defaults_and_valid_settings():
    g = load_config(None, []).guide
    assert (g.enabled, g.hint_column, g.hint_fn, g.replace) == (False, "hint", None, None)
    assert g.hint_template == "{prompt}\nHint: {hint}" and g.success_threshold == 1.0
    cfg = load_config(
        None, [*GUIDE_ON, "guide.replace=3", "guide.hint_template='{hint}: {prompt}'"]
    )
    assert cfg.guide.replace == 3 and cfg.guide.hint_fn == "arithmetic_tens"


def test_spread_indices_pick_floor_n_share_evenly():
    assert spread_indices(6, 0.5) == [1, 3, 5]
    assert spread_indices(5, 0.0) == [] and spread_indices(4, 1.0) == [0, 1, 2, 3]
    assert spread_indices(10, 0.25) == [3, 7]  # floor((i+1)/4) steps up at i = 3, 7
    for n, share in itertools.product(range(13), (0.1, 0.3, 1 / 3, 0.5, 0.9)):
        idx = spread_indices(n, share)
        assert len(idx) == math.floor(n * share + 1e-12)
        # every window of ceil(1/share) consecutive rows holds at least one chosen row
        width = math.ceil(1 / share)
        assert all(any(j in idx for j in range(i, i + width)) for i in range(n - width + 1))
    with pytest.raises(ValueError, match="share must be in"):
        spread_indices(3, 1.5)


def test_warmup_rows_gain_hinted_copies_of_the_chosen_share():
    cfg = load_config(None, ["guide.hint_fn=arithmetic_tens", "guide.warmup_hinted=0.5"])
    rows = [{"prompt": f"{a}+{a}", "answer": str(2 * a)} for a in (7, 13, 25, 40)]
    out = hint_warmup_rows(rows, cfg)
    assert out[:4] == rows  # every row stays, unhinted; copies of rows 1 and 3 follow
    assert out[4:] == [
        {"prompt": "13+13\nHint: the tens digit is 2", "answer": "26"},
        {"prompt": "40+40\nHint: the tens digit is 8", "answer": "80"},
    ]
    assert rows[1]["prompt"] == "13+13"  # the input rows are not modified
    off = dataclasses.replace(cfg, guide=dataclasses.replace(cfg.guide, warmup_hinted=0.0))
    assert hint_warmup_rows(rows, off) is rows


def test_the_warmup_inherits_the_hint_source_with_guide_off():
    cfg = load_config(None, [*GUIDE_ON, "guide.warmup_hinted=0.25", "warmup.steps=5"])
    warm = warmup_config(cfg, "m", "out")
    assert warm.train.algorithm == "sft" and not warm.guide.enabled
    assert (warm.guide.warmup_hinted, warm.guide.hint_fn) == (0.25, "arithmetic_tens")


# ------------------------------------------------------------------------------ the round
class CharTokenizer:
    """A chat-templated character tokenizer (what `encode_prompts` needs)."""

    chat_template = "user: {content}"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<a>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def _cfg(*extra: str):
    return load_config(None, [*GUIDE_ON, "rollout.samples_per_prompt=4", *extra])


def _sample(prompt_ids: list[int], reward: float | None, valid: bool = True) -> Sample:
    return Sample(Rollout(0, prompt_ids, [7, 8], [-1.0, -1.0], "x", "stop", 3), reward, valid)


def _round(cfg, rewards: list[list[float | None]], hinted_reward: float = 1.0):
    tok = CharTokenizer()
    rows = [{"prompt": f"{i}0+{i}", "answer": str(11 * i)} for i in range(len(rewards))]
    groups = []
    for i, row in enumerate(rows):
        ids = tok(tok.apply_chat_template([{"role": "user", "content": row["prompt"]}]))
        groups.append([_sample(ids["input_ids"], r, r is not None) for r in rewards[i]])
    calls = []

    def generate(prompt_ids):
        calls.append(prompt_ids)
        k = cfg.guide.replace or 4
        return [
            Rollout(i, list(p), [40 + j, 41], [-0.25, -0.5], f"y{j}", "stop", 3)
            for i, p in enumerate(prompt_ids)
            for j in range(k)
        ]

    def score(rollouts, reps):  # scored against the group's row, as the unhinted prompt
        for r, row in zip(rollouts, reps, strict=True):
            assert r.prompt_ids == groups[rows.index(row)][0].rollout.prompt_ids
        return [
            Sample(r, hinted_reward if j % 2 == 0 else 0.0, True) for j, r in enumerate(rollouts)
        ]

    out, stats = guide_groups(cfg, tok, groups, rows, generate, score)
    return tok, rows, groups, out, stats, calls


def test_guide_round_replaces_failed_samples_of_all_fail_groups_only():
    cfg = _cfg("guide.replace=2")
    rewards = [[0.0, 1.0, 0.0, 0.0], [0.0, 0.5, None, 0.0], [0.2, 0.1, 0.0, 0.0]]
    tok, rows, groups, out, stats, calls = _round(cfg, rewards)
    assert len(calls) == 1  # one engine call for every all-fail group
    want_prompts = [
        tok(
            tok.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": f"{rows[i]['prompt']}\nHint: {arithmetic_tens(rows[i])}",
                    }
                ]
            )
        )["input_ids"]
        for i in (1, 2)
    ]
    assert calls[0] == want_prompts
    assert out[0] == groups[0]  # a group with a success keeps its samples
    # group 1: the invalid sample (2), then the lowest reward first in position (0)
    # group 2: the two zeros (2, 3)
    for g, slots in ((1, [2, 0]), (2, [2, 3])):
        for j, slot in enumerate(slots):
            s = out[g][slot]
            assert s.hint_prompt_ids == want_prompts[g - 1]
            assert s.rollout.prompt_ids == groups[g][0].rollout.prompt_ids  # the unhinted prompt
            assert s.rollout.completion_ids == [40 + j, 41]  # the sampled ids, untouched
            assert s.rollout.logprobs == [-0.25, -0.5]  # the engine's (hinted-context) ones
        kept = [i for i in range(4) if i not in slots]
        assert [out[g][i] for i in kept] == [groups[g][i] for i in kept]
    assert stats == {
        "all_fail": 2.0,
        "groups": 3.0,
        "hinted": 4.0,
        "hinted_success": 2.0,
        "hinted_reward_sum": 2.0,
        "hinted_known": 4.0,
    }
    m = guide_metrics(stats, enabled=True)
    assert m["guide/all_fail_groups"] == pytest.approx(2 / 3)
    assert m["guide/hinted_samples"] == 4.0
    assert m["guide/hinted_success"] == 0.5
    assert m["guide/hinted_reward_mean"] == 0.5


def test_guide_round_off_counts_all_fail_groups_and_generates_nothing():
    cfg = load_config(None, ["rollout.samples_per_prompt=4"])
    _, _, groups, out, stats, calls = _round(cfg, [[0.0] * 4, [1.0] * 4])
    assert calls == [] and out == groups
    assert guide_metrics(stats, enabled=False) == {"guide/all_fail_groups": 0.5}
    none = guide_metrics({"all_fail": 0.0, "groups": 2.0, "hinted": 0.0}, enabled=True)
    assert math.isnan(none["guide/hinted_success"]) and none["guide/hinted_samples"] == 0.0


def test_guide_round_replace_null_replaces_the_whole_group():
    cfg = _cfg()
    _, _, _, out, stats, _ = _round(cfg, [[0.0, 0.0, 0.0, 0.0]])
    assert all(s.hint_prompt_ids is not None for s in out[0]) and stats["hinted"] == 4.0


# ------------------------------------------------------------------------------ tiny model
class HintAwareEngine:
    """Answers right only when the prompt holds a hint (even samples) and wrong otherwise."""

    weight_version = 0

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.calls = 0

    def generate(self, prompt_ids, sampling):
        self.calls += 1
        out = []
        for i, ids in enumerate(prompt_ids):
            text = self.tok.decode(ids)
            answer = str(solve(re.search(r"\d+[+-]\d+", text).group(0)))
            for j in range(sampling.n):
                reply = answer if "Hint" in text and j % 2 == 0 else "x"
                comp = self.tok(reply, add_special_tokens=False)["input_ids"]
                out.append(Rollout(i, list(ids), comp, [-0.7] * len(comp), reply, "length", 0))
        return out


def test_hinted_rows_train_on_the_unhinted_prompt_with_the_hinted_logp_old(
    tmp_path, tiny_model_dir
):
    from transformers import AutoTokenizer

    from posttrain.algorithms.grpo import GRPO
    from posttrain.algorithms.online import sequences_to_tensors
    from posttrain.data.splits import load_train_eval_rows
    from posttrain.models import load_policy
    from posttrain.rollout.source import RolloutSource
    from tests.tiny_runs import tiny_cfg

    cfg = tiny_cfg(
        tmp_path,
        tiny_model_dir,
        *GUIDE_ON,
        "guide.replace=2",
        "data.max_prompt_tokens=96",
        "rewards=[{name: exact_answer}]",
    )
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train, held = load_train_eval_rows(cfg)
    check_hints(cfg, tok, [train])
    short = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_prompt_tokens=40))
    with pytest.raises(ConfigError, match=r"guide: a hinted prompt does not fit: .*=40"):
        check_hints(short, tok, [train])
    no_fn = dataclasses.replace(cfg, guide=dataclasses.replace(cfg.guide, hint_fn=None))
    with pytest.raises(ConfigError, match=r"guide\.hint_column='hint': .*columns: answer, prompt"):
        check_hints(no_fn, tok, [train])
    engine = HintAwareEngine(tok)
    source = RolloutSource(cfg, tok, engine, train, held, stage_rows=[])
    groups, metrics = source.collect_groups(0)
    assert engine.calls == 2  # the round, then one hinted call for all its all-fail groups
    assert metrics["guide/all_fail_groups"] == 1.0
    assert metrics["guide/hinted_samples"] == 4 * 2
    assert metrics["guide/hinted_success"] == 0.5
    assert metrics["reward/mean"] == 0.0  # the policy's own samples: none right
    for g in groups:
        assert [s.hint_prompt_ids is not None for s in g] == [True, True, False, False]
        assert [s.reward for s in g] == [1.0, 0.0, 0.0, 0.0]

    model = load_policy(tiny_model_dir)
    algo = GRPO(cfg, source, None)
    seqs = [s for g in groups for s in g]
    t = sequences_to_tensors(seqs, torch.zeros(len(seqs)), source.pad_id)
    algo._add_hinted_old(t, seqs, model)
    assert t["logp_old"].shape == t["mask"].shape
    gaps = []
    for i, s in enumerate(seqs):
        start, n = len(s.rollout.prompt_ids) - 1, len(s.rollout.completion_ids)
        row = t["input_ids"][i, : len(s.rollout.prompt_ids) + n].tolist()
        assert row == s.rollout.prompt_ids + s.rollout.completion_ids
        got = t["logp_old"][i, start : start + n]
        if s.hint_prompt_ids is None:  # NaN: the loss takes the current log-probs there
            assert torch.isnan(t["logp_old"][i]).all(), i
            continue
        temp = cfg.rollout.temperature
        want = _completion_logps(model, s.hint_prompt_ids, s.rollout.completion_ids, temp)
        assert torch.allclose(got, want, atol=1e-4), i
        if s.hint_prompt_ids is not None:
            plain = _completion_logps(model, s.rollout.prompt_ids, s.rollout.completion_ids, 1.0)
            gaps.append(float((plain - want).abs().max()))
    assert max(gaps) > 1e-3  # the hinted context really changes the log-probs
    batch = algo.make_batch(0, model)  # the wiring: one more step, hinted rows included
    assert all("logp_old" in mb for mb in batch.micro_batches)


def test_nan_logp_old_rows_train_as_without_guide(tmp_path, tiny_model_dir):
    """Unhinted rows of a Guide step (logp_old NaN when nothing recomputed it) give the loss,
    metrics and gradient of the same micro-batch without logp_old (the detached current ones)."""
    from posttrain.algorithms.grpo import clipped_policy_loss
    from posttrain.models import load_policy
    from tests.tiny_runs import tiny_cfg

    cfg = tiny_cfg(tmp_path, tiny_model_dir)
    model = load_policy(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (3, 12), generator=g)
    mask = torch.zeros(3, 11)
    mask[:, 5:] = 1.0
    mb = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mask": mask,
        "adv": torch.randn(3, 11, generator=g) * mask,
        "logp_roll": -torch.rand(3, 11, generator=g) * mask,
    }
    results = []
    for extra in ({}, {"logp_old": torch.full((3, 11), NAN)}):
        model.zero_grad()
        loss, shares = clipped_policy_loss(cfg, model(input_ids=ids), {**mb, **extra}, 9.0, 18, 0.0)
        loss.backward()
        grad = model.get_input_embeddings().weight.grad.clone()
        results.append((loss.detach(), shares, grad))
    (l0, s0, g0), (l1, s1, g1) = results
    assert torch.isfinite(l0) and l0.item() != 0.0
    assert torch.equal(l0, l1) and s0 == s1 and torch.equal(g0, g1)


def _completion_logps(model, ctx: list[int], completion: list[int], temperature: float):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + completion])).logits[0].float()
    logp = torch.log_softmax(logits[:-1] / temperature, dim=-1)
    targets = torch.tensor(ctx + completion)[1:]
    return logp.gather(1, targets.unsqueeze(1))[:, 0][len(ctx) - 1 :]
