"""REBEL loss and micro-batching, RENT's reward and its validation, OPO's on-policy checks.

Expected values come from explicit loops (math.exp / math.log), never from the code under test.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.algorithms.base import StepBatch, trim_micro_batch
from posttrain.algorithms.online import check_on_policy
from posttrain.algorithms.rebel import Rebel, group_tensors
from posttrain.config import load_config
from posttrain.data.tensors import chunk_indices
from posttrain.errors import ConfigError
from posttrain.rollout.engine import Rollout
from posttrain.rollout.source import Sample
from rewards import RewardConfigError, get_reward, score, validate_rewards


def rebel_cfg(*extra: str):
    return load_config(
        None,
        [
            "train.algorithm=rebel",
            "rollout.samples_per_prompt=2",
            "rollout.prompts_per_step=2",
            "train.micro_batch_size_per_device=4",
            "rollout.temperature=1.0",
            *extra,
        ],
    )


def loop_logprob(logits: list[float], target: int) -> float:
    """log softmax(logits)[target] by hand."""
    z = math.log(sum(math.exp(v) for v in logits))
    return logits[target] - z


# ----------------------------------------------------------------------------- REBEL loss


def test_rebel_loss_two_pairs_matches_hand_computation():
    """Two groups of two samples (two pairs) through `Rebel.loss`, against a loop."""
    eta = 0.5
    algo = Rebel(rebel_cfg(f"rebel.eta={eta}"), source=None)
    # what make_batch puts in the step's batch: valid pairs and loss tokens of the whole step
    step = StepBatch([], denominator=2.0, token_total=5.0)
    V = 3
    # 4 samples, row = 1 prompt token + completion; completions of 2, 1, 2, 1 tokens (0 = pad).
    input_ids = torch.tensor([[0, 1, 2], [0, 2, 0], [0, 2, 1], [0, 1, 0]])
    attention = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, V, generator=g, dtype=torch.float64).float().requires_grad_()
    logp_old = torch.tensor([[-1.0, -0.5], [-2.0, 0.0], [-0.25, -1.5], [-0.75, 0.0]])
    rewards = torch.tensor([1.0, 0.0, 0.1, 1.1])
    mb = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "mask": mask,
        "logp_old": logp_old,
        "logp_roll": logp_old.clone(),
        "reward": rewards,
        "valid": torch.ones(4, dtype=torch.bool),
    }
    loss, shares = algo.loss(SimpleNamespace(logits=logits), mb, step)

    L = logits.detach().tolist()
    seq, seq_old = [], []
    for i in range(4):
        s = s_old = 0.0
        for t in range(2):
            if mask[i, t]:
                s += loop_logprob(L[i][t], int(input_ids[i, t + 1]))
                s_old += float(logp_old[i, t])
        seq.append(s)
        seq_old.append(s_old)
    expected = 0.0
    for i, j in ((0, 1), (2, 3)):
        diff = ((seq[i] - seq_old[i]) - (seq[j] - seq_old[j])) / eta
        expected += (diff - (float(rewards[i]) - float(rewards[j]))) ** 2
    expected /= 2.0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert shares["tis/mismatch_abs_mean"] == 0.0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_rebel_invalid_sample_drops_its_pairs():
    algo = Rebel(rebel_cfg(), source=None)
    step = StepBatch([], denominator=1.0)
    logits = torch.zeros(4, 3, 2, requires_grad=True)  # uniform: logp = log 1/2 per token
    mb = {
        "input_ids": torch.tensor([[0, 1, 1], [0, 1, 1], [0, 1, 1], [0, 1, 1]]),
        "attention_mask": torch.ones(4, 3, dtype=torch.long),
        "mask": torch.ones(4, 2),
        "logp_old": torch.full((4, 2), math.log(0.5)),
        "logp_roll": torch.full((4, 2), math.log(0.5)),
        "reward": torch.tensor([1.0, 0.0, 3.0, 0.0]),
        "valid": torch.tensor([True, True, False, True]),
    }
    loss, _ = algo.loss(SimpleNamespace(logits=logits), mb, step)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)  # only pair (0, 1): (0 - 1)^2


def _samples(rewards: list[list[float | None]], seed: int = 0) -> list[list[Sample]]:
    """Groups of samples with random prompt/completion tokens (lengths vary)."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for gi, row in enumerate(rewards):
        group = []
        for r in row:
            n_prompt = 2 + int(torch.randint(0, 2, (1,), generator=g))
            n_comp = 1 + int(torch.randint(0, 3, (1,), generator=g))
            ids = torch.randint(1, 11, (n_prompt + n_comp,), generator=g).tolist()
            ro = Rollout(gi, ids[:n_prompt], ids[n_prompt:], [-1.0] * n_comp, "x", "stop", 0)
            group.append(Sample(ro, r, r is not None))
        groups.append(group)
    return groups


class TinyLM(torch.nn.Module):
    """Embedding -> linear logits: enough of a causal LM for gradient comparisons."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(12, 8)
        self.out = torch.nn.Linear(8, 12)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.out(torch.tanh(self.emb(input_ids))))


def _grads(algo: Rebel, model: TinyLM, t: dict, size: int, step: StepBatch) -> list[torch.Tensor]:
    model.zero_grad()
    n = t["input_ids"].shape[0]
    for idx in chunk_indices(n, size):
        mb = trim_micro_batch({k: v[idx] for k, v in t.items()})
        loss, _ = algo.loss(model(mb["input_ids"]), mb, step)
        loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_rebel_micro_batch_size_does_not_change_the_gradient():
    """Micro-batches of one group, two groups or all four: the same step gradient."""
    rewards = [[1.0, 0.0, 0.5], [0.0, None, 1.0], [1.0, 1.0, 0.0], [0.2, 0.9, 0.4]]
    t = group_tensors(_samples(rewards), pad_id=0)
    g = torch.Generator().manual_seed(1)
    t["logp_old"] = -torch.rand(t["mask"].shape, generator=g)  # non-trivial residuals
    cfg = rebel_cfg("rollout.samples_per_prompt=3", "train.micro_batch_size_per_device=3")
    algo = Rebel(cfg, source=None)
    step = StepBatch([], denominator=3 + 1 + 3 + 3)  # the group with a None reward keeps one pair
    model = TinyLM()
    full = _grads(algo, model, t, 12, step)
    for size in (3, 6):
        for a, b in zip(full, _grads(algo, model, t, size, step), strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    assert max(float(a.abs().max()) for a in full) > 1e-4


def test_rebel_config_cross_checks():
    assert rebel_cfg().rebel.eta == 1.0
    bad = {
        "loss.ratio_level=sequence": "loss.ratio_level=sequence",
        "loss.dual_clip_c=3": "loss.dual_clip_c",
        "kl.coef=0.1": "kl.coef",
        "advantage.estimator=rloo": "advantage.estimator=rloo",
        "advantage.entropy_modulation=1.0": "advantage.entropy_modulation",
        "loss.aggregation=seq_mean_token_mean": "loss.aggregation",
    }
    for override, named in bad.items():
        with pytest.raises(ConfigError, match=f"train.algorithm=rebel cannot use {named}"):
            rebel_cfg(override)
    with pytest.raises(ConfigError, match="micro_batch_size_per_device=3 must be a multiple of"):
        rebel_cfg("train.micro_batch_size_per_device=3")
    with pytest.raises(ConfigError, match=r"rebel\.eta must be > 0"):
        rebel_cfg("rebel.eta=0")


# ----------------------------------------------------------------------------- OPO


def test_opo_needs_exactly_one_update_per_batch():
    load_config(None, ["advantage.estimator=opo", "train.updates_per_batch=1"])
    with pytest.raises(
        ConfigError, match=r"advantage.estimator=opo .* train.updates_per_batch must be 1, got 2"
    ):
        load_config(None, ["advantage.estimator=opo", "train.updates_per_batch=2"])


def test_check_on_policy_names_stale_versions():
    groups = _samples([[1.0, 0.0], [0.0, 1.0]])
    for s in groups[1]:
        s.rollout.weight_version = 3
    check_on_policy(groups[1:], 3)
    with pytest.raises(RuntimeError, match=r"weight version\(s\) \[0\] while the trainer's .* 3"):
        check_on_policy(groups, 3)


# ----------------------------------------------------------------------------- RENT


def test_neg_entropy_reward_reads_the_entropy_column():
    fn = get_reward("neg_entropy")
    assert fn(["p", "q", "r"], ["a", "b", "c"], token_entropy=[0.5, None, 0.0]) == [
        -0.5,
        None,
        -0.0,
    ]
    result = score(["neg_entropy"], ["p", "q"], ["a", "b"], {"token_entropy": [1.25, 0.75]})
    assert result.total == [-1.25, -0.75]


def test_neg_entropy_needs_a_caller_that_supplies_the_entropy():
    validate_rewards(
        ["neg_entropy", "format_number"], {"answer": None}, model_columns=["token_entropy"]
    )
    with pytest.raises(RewardConfigError, match=r"'neg_entropy' needs 'token_entropy'.*cannot be"):
        validate_rewards(["neg_entropy"], {"answer": None})
    with pytest.raises(RewardConfigError, match="column 'token_entropy' would be overwritten"):
        validate_rewards(["neg_entropy"], {"token_entropy": None}, model_columns=["token_entropy"])
    with pytest.raises(ConfigError, match=r"eval\.reward=neg_entropy: evaluation cannot supply"):
        load_config(None, ["eval.reward=neg_entropy"])


def test_neg_entropy_with_an_algorithm_that_cannot_supply_it():
    from posttrain.rollout.factory import check_rewards

    rows = [{"prompt": "1+1", "answer": "2"}]
    check_rewards(load_config(None, ["rewards=[{name: neg_entropy}]"]), rows)
    check_rewards(rebel_cfg("rewards=[{name: neg_entropy}]"), rows)
    sft = load_config(None, ["rewards=[{name: neg_entropy}]", "train.algorithm=sft"])
    with pytest.raises(ConfigError, match="only the sampling algorithms"):
        check_rewards(sft, rows)
