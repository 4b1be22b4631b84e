"""Tests for posttrain.advantages against hand-computed values and naive python loops."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from posttrain.advantages import (
    SEQUENCE_ESTIMATORS,
    broadcast_to_tokens,
    entropy_modulation,
    filter_zero_variance_groups,
    gae,
    kl_shaped_rewards,
    overlong_penalty,
    sequence_advantages,
    whiten,
)

ATOL = 1e-5
EPS = 1e-6


def _close(t, expected, atol=ATOL):
    torch.testing.assert_close(t.float(), torch.tensor(expected).float(), atol=atol, rtol=1e-5)


def _std(xs):
    return statistics.stdev(xs) if len(xs) >= 2 else 0.0


def _naive_seq_adv(rewards, valid, est, lengths=None):
    """Loop implementation of every sequence estimator (python floats)."""
    P, G = len(rewards), len(rewards[0])
    all_valid = [rewards[p][g] for p in range(P) for g in range(G) if valid[p][g]]
    out = [[0.0] * G for _ in range(P)]
    for p in range(P):
        idx = [g for g in range(G) if valid[p][g]]
        rs = [rewards[p][g] for g in idx]
        flat = len(rs) < 2 or max(rs) == min(rs)
        for g in idx:
            R = rewards[p][g]
            if est == "reinforce_pp":
                out[p][g] = (R - statistics.fmean(all_valid)) / (_std(all_valid) + EPS)
                continue
            if flat:
                continue
            mean = statistics.fmean(rs)
            if est == "grpo":
                out[p][g] = (R - mean) / (statistics.stdev(rs) + EPS)
            elif est == "dr_grpo":
                out[p][g] = R - mean
            elif est == "batch_std":
                out[p][g] = (R - mean) / (_std(all_valid) + EPS)
            elif est == "rloo":
                others = [rewards[p][h] for h in idx if h != g]
                out[p][g] = R - sum(others) / len(others)
            elif est == "opo":
                ls = [lengths[p][h] for h in idx]
                b = sum(lengths[p][h] * rewards[p][h] for h in idx) / sum(ls)
                out[p][g] = R - b
    return out


REWARDS = [
    [1.0, 0.0, 0.5, 1.0],
    [1.0, 1.0, 1.0, 1.0],  # all equal
    [0.3, 9.0, 0.7, 0.2],  # 9.0 is invalid
    [2.0, -1.0, 5.0, 0.0],  # only one valid
    [0.0, 1.0, 0.0, 0.0],
]
VALID = [
    [True, True, True, True],
    [True, True, True, True],
    [True, False, True, True],
    [False, True, False, False],
    [True, True, True, False],
]
LENGTHS = [[3, 5, 2, 7], [1, 1, 1, 1], [4, 4, 1, 2], [3, 3, 3, 3], [2, 8, 1, 1]]


@pytest.mark.parametrize("est", SEQUENCE_ESTIMATORS)
def test_sequence_advantages_match_loop(est):
    got = sequence_advantages(
        torch.tensor(REWARDS), torch.tensor(VALID), est, lengths=torch.tensor(LENGTHS)
    )
    assert got.shape == (5, 4) and got.dtype == torch.float32
    _close(got, _naive_seq_adv(REWARDS, VALID, est, LENGTHS), atol=1e-4)
    assert (got[~torch.tensor(VALID)] == 0).all()
    if est != "reinforce_pp":
        assert (got[1] == 0).all() and (got[3] == 0).all()


def test_grpo_hand_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    got = sequence_advantages(r, torch.ones(1, 4, dtype=torch.bool), "grpo", eps=0.0)
    # mean .25, sample std sqrt((.5625 + 3 * .0625) / 3) = .5
    _close(got, [[1.5, -0.5, -0.5, -0.5]])
    # all-equal non-trivial float values give exactly 0
    eq = torch.full((1, 3), 0.1)
    assert (sequence_advantages(eq, torch.ones(1, 3, dtype=torch.bool), "grpo") == 0).all()


def test_rloo_and_opo_hand_values():
    r = torch.tensor([[1.0, 0.0, 0.0]])
    v = torch.ones(1, 3, dtype=torch.bool)
    _close(sequence_advantages(r, v, "rloo"), [[1.0, -0.5, -0.5]])
    # opo: b = (1*1 + 2*0 + 1*0) / 4 = .25
    opo = sequence_advantages(r, v, "opo", lengths=torch.tensor([[1, 2, 1]]))
    _close(opo, [[0.75, -0.25, -0.25]])
    with pytest.raises(ValueError):
        sequence_advantages(r, v, "opo")
    with pytest.raises(ValueError, match=r"^estimator='gae'"):
        sequence_advantages(r, v, "gae")


@pytest.mark.parametrize("est", SEQUENCE_ESTIMATORS)
def test_sequence_advantages_order_invariance(est):
    r, v, ln = torch.tensor(REWARDS), torch.tensor(VALID), torch.tensor(LENGTHS)
    base = sequence_advantages(r, v, est, lengths=ln)
    gp = torch.tensor([4, 2, 0, 3, 1])
    sp = torch.tensor([2, 0, 3, 1])
    got = sequence_advantages(r[gp][:, sp], v[gp][:, sp], est, lengths=ln[gp][:, sp])
    _close(got, base[gp][:, sp].tolist())


@pytest.mark.parametrize("est", SEQUENCE_ESTIMATORS)
def test_invalid_reward_values_do_not_matter(est):
    r, v, ln = torch.tensor(REWARDS), torch.tensor(VALID), torch.tensor(LENGTHS)
    base = sequence_advantages(r, v, est, lengths=ln)
    r2 = torch.where(v, r, torch.tensor(float("nan")))
    torch.testing.assert_close(sequence_advantages(r2, v, est, lengths=ln), base)


def test_broadcast_to_tokens():
    m = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    _close(
        broadcast_to_tokens(torch.tensor([2.0, 3.0, -1.0]), m), [[2, 2, 0], [0, 0, 0], [-1, 0, 0]]
    )


def test_filter_zero_variance_groups():
    keep = filter_zero_variance_groups(torch.tensor(REWARDS), torch.tensor(VALID))
    assert keep.tolist() == [True, False, True, False, True]
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert filter_zero_variance_groups(r).tolist() == [False, True]


def test_overlong_penalty_hand_values():
    lengths = torch.tensor([0, 12, 13, 14, 16, 17, 100])
    # L_max = 16, L_buf = 4: zero up to 12, then (12 - |y|)/4, -1 beyond 16
    _close(overlong_penalty(lengths, 16, 4), [0, 0, -0.25, -0.5, -1.0, -1.0, -1.0])
    _close(overlong_penalty(torch.tensor([16, 17]), 16, 0), [0.0, -1.0])
    with pytest.raises(ValueError, match=r"^buffer must be in"):
        overlong_penalty(lengths, 16, 20)


def test_kl_shaped_rewards_hand_values():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    got = kl_shaped_rewards(torch.tensor([1.0, 2.0, 3.0]), kl, mask, beta=0.5)
    _close(got, [[-0.05, -0.1, 1 - 0.15], [2 - 0.25, 0, 0], [0, 0, 0]])


def _naive_gae(rs, vs, gamma, lam):
    n = len(rs)
    adv = [0.0] * n
    for t in range(n):
        acc = 0.0
        for k in range(t, n):
            nv = vs[k + 1] if k + 1 < n else 0.0
            acc += (gamma * lam) ** (k - t) * (rs[k] + gamma * nv - vs[k])
        adv[t] = acc
    return adv, [a + v for a, v in zip(adv, vs, strict=True)]


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_loop_with_right_padding(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = [6, 3, 1, 0]
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    adv, ret = gae(r, v, mask, gamma, lam)
    for b, n in enumerate(lengths):
        ea, er = _naive_gae(r[b, :n].tolist(), v[b, :n].tolist(), gamma, lam)
        _close(adv[b], ea + [0.0] * (T - n))
        _close(ret[b], er + [0.0] * (T - n))
    if gamma == lam == 1.0:  # returns are then the undiscounted reward-to-go
        _close(ret[0], torch.flip(torch.cumsum(torch.flip(r[0], [0]), 0), [0]).tolist())


def test_gae_padding_invariance_and_left_prompt_positions():
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae(r, v, mask)
    pad = torch.full((2, 3), 5.0)
    adv2, ret2 = gae(torch.cat([r, pad], 1), torch.cat([v, pad], 1), torch.cat([mask, 0 * pad], 1))
    torch.testing.assert_close(adv2[:, :4], adv)
    torch.testing.assert_close(ret2[:, :4], ret)
    assert (adv2[:, 4:] == 0).all()
    # masked prompt positions on the left do not change the completion's advantages
    adv3, _ = gae(torch.cat([pad, r], 1), torch.cat([pad, v], 1), torch.cat([0 * pad, mask], 1))
    torch.testing.assert_close(adv3[:, 3:], adv)


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 0.0, 0.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    out = whiten(x, mask, eps=0.0)
    vals = [1.0, 2.0, 3.0, 4.0]
    mu, sd = statistics.fmean(vals), statistics.stdev(vals)
    _close(out, [[(1 - mu) / sd, (2 - mu) / sd, (3 - mu) / sd, 0], [(4 - mu) / sd, 0, 0, 0]])
    keep = whiten(x, mask, shift_mean=False, eps=0.0)
    _close(keep[0, :3], [(v - mu) / sd + mu for v in (1.0, 2.0, 3.0)])


def test_entropy_modulation_hand_values():
    adv = torch.tensor([[1.0, 1.0, 7.0], [-2.0, 0.0, 0.0]])
    ent = torch.tensor([[0.0, 1.0, 3.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    k = 0.5
    gs = [math.exp(-k * h) for h in (0.0, 1.0, 2.0)]
    mean = sum(gs) / 3
    out = entropy_modulation(adv, ent, mask, k)
    _close(out, [[gs[0] / mean, gs[1] / mean, 0], [-2 * gs[2] / mean, 0, 0]])
    # with A = 1 everywhere, the mean over masked tokens of the modulated advantage is 1
    ones = entropy_modulation(torch.ones(2, 3), ent, mask, k)
    assert (ones.sum() / mask.sum()).item() == pytest.approx(1.0)
    # an explicit step mean (micro-batch use) is honoured
    half = entropy_modulation(adv, ent, mask, k, step_mean=2 * mean)
    torch.testing.assert_close(half, out / 2)


def test_whiten_and_modulation_padding_invariance():
    g = torch.Generator().manual_seed(2)
    x, ent = torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    pad = torch.full((3, 2), 50.0)
    mask_p = torch.cat([mask, torch.zeros(3, 2, dtype=mask.dtype)], 1)
    torch.testing.assert_close(whiten(torch.cat([x, pad], 1), mask_p)[:, :4], whiten(x, mask))
    got = entropy_modulation(torch.cat([x, pad], 1), torch.cat([ent, pad], 1), mask_p, 0.7)
    torch.testing.assert_close(got[:, :4], entropy_modulation(x, ent, mask, 0.7))
