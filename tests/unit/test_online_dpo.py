"""Online DPO: pair selection from scored groups, and the loss on a fixed batch.

Expected values come from hand-written lists and explicit loops (math.exp / math.log), and from
`losses.preference_loss` / `losses.rpo_nll` (the offline DPO path) on the same log-probs.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain import losses
from posttrain.algorithms.online_dpo import OnlineDPO, select_pairs
from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.rollout.engine import Rollout
from posttrain.rollout.source import Sample


def odpo_cfg(*extra: str):
    return load_config(
        None,
        [
            "train.algorithm=online_dpo",
            "rollout.samples_per_prompt=4",
            "rollout.prompts_per_step=6",
            "train.micro_batch_size_per_device=2",
            *extra,
        ],
    )


def _group(gi: int, rewards: list, valid: list[bool] | None = None, seed: int = 0) -> list[Sample]:
    """Samples of one prompt: a shared prompt, random completions of 1-3 tokens."""
    g = torch.Generator().manual_seed(seed * 100 + gi)
    prompt = torch.randint(1, 11, (2 + gi % 2,), generator=g).tolist()
    out = []
    for i, r in enumerate(rewards):
        n = 1 + int(torch.randint(0, 3, (1,), generator=g))
        comp = torch.randint(1, 11, (n,), generator=g).tolist()
        ro = Rollout(gi, prompt, comp, [-1.0] * n, "x", "stop", 0)
        ok = (r is not None) if valid is None else valid[i]
        out.append(Sample(ro, r, ok))
    return out


# rewards per prompt, and (chosen, rejected) or the reason it is skipped, worked out by hand
GROUPS = [
    ([0.1, 1.1, 0.0, 1.1], None),  # chosen 1 (first of the tied maxima), rejected 2
    ([1.0, 1.0, 1.0, 1.0], None),  # all tie -> skipped (tie)
    ([None, 0.5, None, None], None),  # one valid sample -> skipped (invalid)
    ([0.2, None, 0.7, 0.2], None),  # chosen 2, rejected 0 (first of the tied minima)
    ([0.5, None, 0.5, None], None),  # two valid, equal -> skipped (tie)
    ([1.1, 0.0, 0.1, 0.1], [True, False, True, True]),  # 0.0 masked (truncated): chosen 0, rej 2
]
EXPECTED_PAIRS = [(0, 1, 2), (3, 2, 0), (5, 0, 2)]


def _groups(seed: int = 0) -> list[list[Sample]]:
    return [_group(gi, r, v, seed) for gi, (r, v) in enumerate(GROUPS)]


def test_select_pairs_hand_computed():
    pairs, counts = select_pairs(_groups())
    assert pairs == EXPECTED_PAIRS
    assert counts == {"used": 3, "ties": 2, "invalid": 1}


class TinyLM(torch.nn.Module):
    """Embedding -> linear logits: enough of a causal LM for the loss."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(12, 8)
        self.out = torch.nn.Linear(8, 12)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.out(torch.tanh(self.emb(input_ids))))


class FakeSource:
    """A RolloutSource stand-in that returns fixed scored groups."""

    pad_id = 0

    def __init__(self, groups: list[list[Sample]]) -> None:
        self.groups = groups

    def collect_groups(self, step, model=None):
        return self.groups, {"reward/total/mean": 0.5, "accuracy": 0.25}


def loop_seq_logp(model: TinyLM, s: Sample) -> tuple[float, list[float]]:
    """Sum (and list) of the completion tokens' log-probs under `model`, by explicit loops."""
    ids = s.rollout.prompt_ids + s.rollout.completion_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].tolist()
    toks = []
    for t in range(len(s.rollout.prompt_ids), len(ids)):
        row = logits[t - 1]
        z = math.log(sum(math.exp(v) for v in row))
        toks.append(row[ids[t]] - z)
    return sum(toks), toks


@pytest.mark.parametrize("nll_coef", [0.0, 0.5])
def test_online_loss_equals_dpo_loss_by_hand(nll_coef):
    beta = 0.3
    cfg = odpo_cfg(f"dpo.beta={beta}", f"dpo.nll_coef={nll_coef}")
    groups = _groups(seed=1)
    policy, ref = TinyLM(0), TinyLM(7)
    algo = OnlineDPO(cfg, FakeSource(groups), ref_model=ref)
    batch = algo.make_batch(0, policy)
    assert [mb["input_ids"].shape[0] for mb in batch.micro_batches] == [4, 2]  # 2 + 1 pairs
    assert batch.metrics["pairs/used"] == 3.0
    assert batch.metrics["pairs/skipped_ties"] == 2.0
    assert batch.metrics["pairs/skipped_invalid"] == 1.0
    assert batch.denominator == 3.0
    # the samples' answer accuracy moves aside: `accuracy` is the loss's (DPO's) metric
    assert batch.metrics["rollout/accuracy"] == 0.25 and "accuracy" not in batch.metrics

    total, shares = 0.0, {}
    for mb in batch.micro_batches:
        loss, sh = algo.loss(policy(mb["input_ids"]), mb, batch)
        total += float(loss.detach())
        for k, v in sh.items():
            shares[k] = shares.get(k, 0.0) + v

    # by hand: h = beta [(pi_w - ref_w) - (pi_l - ref_l)], loss = log(1 + exp(-h)) (+ alpha nll)
    want, margin, acc, rc, rr = 0.0, 0.0, 0.0, 0.0, 0.0
    pw_all, pl_all, fw_all, fl_all, nll_all = [], [], [], [], []
    for g, w, lo in EXPECTED_PAIRS:
        pw, toks_w = loop_seq_logp(policy, groups[g][w])
        pl, _ = loop_seq_logp(policy, groups[g][lo])
        fw, _ = loop_seq_logp(ref, groups[g][w])
        fl, _ = loop_seq_logp(ref, groups[g][lo])
        h = beta * ((pw - fw) - (pl - fl))
        nll = -sum(toks_w) / len(toks_w)
        want += math.log(1.0 + math.exp(-h)) + nll_coef * nll
        rc, rr = rc + beta * (pw - fw), rr + beta * (pl - fl)
        margin += h
        acc += float(h > 0)
        pw_all.append(pw), pl_all.append(pl), fw_all.append(fw), fl_all.append(fl)
        nll_all.append(nll)
    assert total == pytest.approx(want / 3, rel=1e-5)
    assert shares["rewards/chosen"] == pytest.approx(rc / 3, rel=1e-5, abs=1e-7)
    assert shares["rewards/rejected"] == pytest.approx(rr / 3, rel=1e-5, abs=1e-7)
    assert shares["margin"] == pytest.approx(margin / 3, rel=1e-5, abs=1e-7)
    assert shares["accuracy"] == pytest.approx(acc / 3)
    assert ("nll" in shares) == bool(nll_coef)

    # the offline DPO path's functions on the same log-probs give the same number
    t = torch.tensor
    per_pair, _ = losses.preference_loss(
        t(pw_all), t(pl_all), t(fw_all), t(fl_all), kind="sigmoid", beta=beta
    )
    offline = per_pair + nll_coef * t(nll_all)
    assert total == pytest.approx(float(offline.mean()), rel=1e-5)


def test_global_denominator_and_policy_equals_reference():
    """Loss = sum of pair losses / the step's pair count; log(2) per pair when policy == ref."""
    cfg = odpo_cfg("dpo.beta=0.1")
    algo = OnlineDPO(cfg, FakeSource(_groups()), ref_model=TinyLM(0))
    batch = algo.make_batch(0, None)
    batch.denominator = 6.0  # as if another rank held 3 more pairs
    policy = TinyLM(0)
    total = sum(
        float(algo.loss(policy(mb["input_ids"]), mb, batch)[0].detach())
        for mb in batch.micro_batches
    )
    assert total == pytest.approx(3 * math.log(2.0) / 6.0, rel=1e-6)


def test_rank_without_pairs_trains_a_zero_weight_pair():
    groups = [_group(0, [1.0, 1.0, 1.0, 1.0]), _group(1, [0.0, 0.0, 0.0, 0.0])]
    algo = OnlineDPO(odpo_cfg(), FakeSource(groups), ref_model=TinyLM(7))
    batch = algo.make_batch(0, None)
    assert batch.metrics["pairs/used"] == 0.0 and batch.metrics["pairs/skipped_ties"] == 2.0
    (mb,) = batch.micro_batches
    policy = TinyLM(0)
    loss, shares = algo.loss(policy(mb["input_ids"]), mb, batch)
    assert float(loss.detach()) == 0.0 and all(v == 0.0 for v in shares.values())
    loss.backward()  # still a graph: every rank runs backward


def test_online_dpo_config_checks():
    assert odpo_cfg().train.algorithm == "online_dpo"
    with pytest.raises(ConfigError, match="samples_per_prompt must be >= 2 for online_dpo"):
        odpo_cfg("rollout.samples_per_prompt=1")
    with pytest.raises(ConfigError, match=r"online_dpo cannot use kl\.coef"):
        odpo_cfg("kl.coef=0.1")
    with pytest.raises(ConfigError, match=r"online_dpo cannot use advantage\.estimator"):
        odpo_cfg("advantage.estimator=rloo")
