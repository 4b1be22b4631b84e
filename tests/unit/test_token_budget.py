"""Token-budget micro-batches (`train.max_tokens_per_micro_batch`): the packing function, the
split of a step's tensors, the zero-weight padding micro-batch, `train/pad_fraction`, the
config rules, and the gradient of a GRPO step (plain torch) with and without a budget."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from posttrain.algorithms.base import (
    PADDING_KEY,
    StepBatch,
    empty_micro_batch,
    max_over_ranks,
    model_inputs,
    pad_counts,
    split_micro_batches,
    trim_micro_batch,
)
from posttrain.algorithms.grpo import clipped_policy_loss
from posttrain.config import load_config
from posttrain.data.tensors import chunk_indices, token_budget_groups
from posttrain.errors import ConfigError
from posttrain.losses import AGGREGATION_MODES, aggregation_denominator
from posttrain.trainer import micro_batch_metrics

# ------------------------------------------------------------------------------ packing


def test_token_budget_groups_hand_example():
    # lengths 5, 9, 3, 20, 9, 2 with budget 18: longest first 20 | 9 9 | 5 3 2
    groups = token_budget_groups([5, 9, 3, 20, 9, 2], 18)
    assert groups == [[3], [1, 4], [0, 2, 5]]  # 20 > 18 alone; 2 x 9 = 18; 3 x 5 = 15


def _reference_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """The greedy packing written as a plain loop over a descending stable sort."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            last = groups[-1]
            width = max(lengths[j] for j in [*last, i])
            if (len(last) + 1) * width <= budget:
                last.append(i)
                continue
        groups.append([i])
    return groups


@pytest.mark.parametrize("seed", range(20))
def test_token_budget_groups_matches_a_loop_and_keeps_the_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 64))]
    budget = rng.choice([1, 64, 256, 1000, 4096])
    groups = token_budget_groups(lengths, budget)
    assert groups == _reference_groups(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each row once
    for g in groups:
        padded = len(g) * max(lengths[i] for i in g)
        assert padded <= budget or len(g) == 1  # within budget, or one too-long row alone
        if len(g) == 1 and lengths[g[0]] > budget:
            assert padded > budget
    # greedy: the next group's first row would not have fit into the group before it
    for a, b in itertools.pairwise(groups):
        assert (len(a) + 1) * max(lengths[i] for i in a + b[:1]) > budget


def test_token_budget_groups_empty_and_huge_budget():
    assert token_budget_groups([], 10) == []
    assert token_budget_groups([3, 7, 5], 10**9) == [[1, 2, 0]]


# ------------------------------------------------------------------------ step tensors


def _step_tensors(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded GRPO-shaped tensors: ids/attention [N, L], per-target [N, L-1]."""
    g = torch.Generator().manual_seed(seed)
    n, width = len(lengths), max(lengths)
    att = torch.zeros(n, width, dtype=torch.long)
    for i, n_tok in enumerate(lengths):
        att[i, :n_tok] = 1
    ids = torch.randint(1, 100, (n, width), generator=g) * att
    mask = torch.zeros(n, width - 1)
    for i, n_tok in enumerate(lengths):
        mask[i, 1 : n_tok - 1] = 1.0  # 1-token "prompt", the rest is completion
    adv = torch.randn(n, 1, generator=g).expand(n, width - 1) * mask
    logp_roll = -torch.rand(n, width - 1, generator=g) * mask
    return {
        "input_ids": ids,
        "attention_mask": att,
        "mask": mask,
        "adv": adv.contiguous(),
        "logp_roll": logp_roll,
        "logp_old": logp_roll + 0.01 * mask,
    }


def test_split_fixed_is_todays_chunking():
    t = _step_tensors([9, 4, 7, 3, 8])
    got = split_micro_batches(t, 2, None)
    want = [trim_micro_batch({k: v[idx] for k, v in t.items()}) for idx in chunk_indices(5, 2)]
    assert len(got) == len(want) == 3
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_split_budget_keeps_every_row_once_trimmed():
    lengths = [9, 4, 7, 3, 8, 12, 2]
    t = _step_tensors(lengths)
    micro = split_micro_batches(t, 2, 16)
    groups = token_budget_groups(lengths, 16)
    assert len(micro) == len(groups)
    for mb, idx in zip(micro, groups, strict=True):
        width = max(lengths[i] for i in idx)
        assert mb["input_ids"].shape == (len(idx), width)
        assert mb["mask"].shape == (len(idx), width - 1)
        assert torch.equal(mb["input_ids"], t["input_ids"][idx, :width])
        assert torch.equal(mb["adv"], t["adv"][idx, : width - 1])
        assert mb["input_ids"].numel() <= 16 or len(idx) == 1
    assert max_over_ranks(len(micro)) == len(micro)  # one process: no padding


def test_empty_micro_batch_is_two_attended_tokens_of_zeros():
    mb = trim_micro_batch({k: v[[0, 1]] for k, v in _step_tensors([9, 4]).items()})
    e = empty_micro_batch(mb)
    assert e.keys() == mb.keys() | {PADDING_KEY}
    assert torch.equal(e["input_ids"], mb["input_ids"][:1, :2])
    assert torch.equal(e["attention_mask"], torch.ones(1, 2, dtype=torch.long))
    for k in ("mask", "adv", "logp_roll", "logp_old"):
        assert e[k].shape == (1, 1) and not e[k].any()


# --------------------------------------------------------------------------- metrics


def test_pad_fraction_hand_computed():
    a = {"attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])}
    b = {"attention_mask": torch.tensor([[1, 1], [1, 1]])}
    packed = {"attention_mask": torch.ones(1, 1, 3, 3, dtype=torch.bool)}  # not counted
    empty = empty_micro_batch({"input_ids": a["attention_mask"], **a})  # 2 wasted slots
    assert pad_counts([a, b, packed]) == (5.0, 16.0)
    assert pad_counts([a, b, packed, empty]) == (7.0, 18.0)
    metrics = micro_batch_metrics(StepBatch([a, b, packed, empty]))
    assert metrics["train/pad_fraction"] == 7 / 18
    assert metrics["train/micro_batches"] == 4.0
    assert metrics["train/padding_micro_batches"] == 1.0


def test_budget_cuts_padding_of_a_spread_of_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(8, 256) for _ in range(64)]
    t = _step_tensors(lengths)
    fixed = pad_counts(split_micro_batches(t, 8, None))
    budget = pad_counts(split_micro_batches(t, 8, 2048))
    real = float(sum(lengths))
    assert fixed[1] - fixed[0] == budget[1] - budget[0] == real  # same non-pad tokens
    assert budget[0] / budget[1] < fixed[0] / fixed[1]


# ------------------------------------------------------------------------------ config


def test_config_rules():
    assert (
        load_config(None, ["train.max_tokens_per_micro_batch=512"]).train.max_tokens_per_micro_batch
        == 512
    )
    ppo = ["train.algorithm=ppo", "advantage.estimator=gae", "train.max_tokens_per_micro_batch=64"]
    assert load_config(None, ppo).train.max_tokens_per_micro_batch == 64
    with pytest.raises(ConfigError, match=r"max_tokens_per_micro_batch=0 must be >= 1"):
        load_config(None, ["train.max_tokens_per_micro_batch=0"])
    for algo in ("dpo", "rebel", "online_dpo", "reward_model"):
        with pytest.raises(ConfigError, match=rf"supported for .*not {algo}"):
            load_config(None, [f"train.algorithm={algo}", "train.max_tokens_per_micro_batch=64"])
    with pytest.raises(ConfigError, match=r"sft.packing"):
        load_config(
            None,
            ["train.algorithm=sft", "sft.packing=true", "train.max_tokens_per_micro_batch=64"],
        )


# --------------------------------------------------------------- gradient (plain torch)


@pytest.fixture(scope="module")
def tiny_policy(tiny_model_dir):
    from posttrain.models import load_policy

    return load_policy(tiny_model_dir).float()


def _grads(model, micro, cfg, denominator, token_total) -> tuple[list[torch.Tensor], float]:
    model.zero_grad(set_to_none=True)
    total = 0.0
    for mb in micro:
        loss, _ = clipped_policy_loss(
            cfg, model(**model_inputs(mb)), mb, denominator, token_total, 0.0
        )
        loss.backward()
        total += float(loss.detach())
    return [p.grad.clone() for p in model.parameters()], total


@pytest.mark.parametrize("aggregation", AGGREGATION_MODES)
def test_budget_and_padding_micro_batch_keep_the_gradient(tiny_policy, aggregation):
    cfg = load_config(None, [f"loss.aggregation={aggregation}", "rollout.max_new_tokens=12"])
    lengths = [13, 5, 9, 4, 11, 7, 3, 8]
    t = _step_tensors(lengths, seed=1)
    denominator = aggregation_denominator(t["mask"], aggregation)
    tokens = float(t["mask"].sum())
    fixed, loss_fixed = _grads(
        tiny_policy, split_micro_batches(t, 8, None), cfg, denominator, tokens
    )
    micro = split_micro_batches(t, 8, 20)
    assert len(micro) >= 3
    budget, loss_budget = _grads(
        tiny_policy, [*micro, empty_micro_batch(micro[0])], cfg, denominator, tokens
    )
    assert loss_budget == pytest.approx(loss_fixed, abs=1e-6)
    worst = max(float((a - b).abs().max()) for a, b in zip(fixed, budget, strict=True))
    assert worst < 1e-6
    assert max(float(g.abs().max()) for g in fixed) > 1e-4  # a real gradient
    # the padding micro-batch alone: zero loss, zero (finite) gradient
    alone, loss_alone = _grads(tiny_policy, [empty_micro_batch(micro[0])], cfg, denominator, tokens)
    assert loss_alone == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in alone)
