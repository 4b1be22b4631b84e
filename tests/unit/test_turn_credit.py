"""Per-turn credit assignment (posttrain/turn_credit.py) against hand-computed values and plain
loops, its exact reduction to episode-level advantages, the Episode -> Rollout -> tensors glue,
guess_number's progress and the config checks."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from posttrain.advantages import SEQUENCE_ESTIMATORS, sequence_advantages
from posttrain.algorithms.online import sequences_to_tensors, turn_index_tensor, turn_tensors
from posttrain.config import CHOICES, load_config
from posttrain.envs import Turn, make_environment
from posttrain.envs.guess_number import interval_progress
from posttrain.errors import ConfigError
from posttrain.rollout.episodes import Episode, episode_rollout
from posttrain.rollout.source import Sample
from posttrain.turn_credit import (
    CREDIT_MODES,
    ENTROPY_MODULATION_LEVELS,
    discounted_returns,
    progress_turn_rewards,
    turn_advantages,
    turn_entropy_modulation,
    turn_returns,
    turn_token_advantages,
)

EPS = 1e-6
NAN = float("nan")


def test_config_choices_are_the_turn_credit_registries():
    assert CHOICES["advantage.credit"] is CREDIT_MODES
    assert CHOICES["advantage.entropy_modulation_level"] is ENTROPY_MODULATION_LEVELS
    a = load_config(None, []).advantage
    assert (a.credit, a.turn_discount, a.entropy_modulation_level) == ("episode", 1.0, "token")


# ----------------------------------------------------------------------------- returns


def test_discounted_returns_hand_values():
    # episode 0: 3 turns, r = [0, 0.5, 0], F = 1, gamma = 0.9:
    #   G_2 = 0 + 1 = 1, G_1 = 0.5 + 0.9 * 1 = 1.4, G_0 = 0 + 0.9 * 1.4 = 1.26
    # episode 1: 1 turn, r = [0.2], F = 0.5 -> G_0 = 0.7 (its padded turns hold garbage)
    r = torch.tensor([[0.0, 0.5, 0.0], [0.2, 9.0, 9.0]])
    out = discounted_returns(r, torch.tensor([1.0, 0.5]), torch.tensor([3, 1]), gamma=0.9)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor([[1.26, 1.4, 1.0], [0.7, 0.0, 0.0]]).double())


def _loop_returns(r: list[float], final: float, gamma: float) -> list[float]:
    n = len(r)
    return [
        sum(gamma ** (j - k) * r[j] for j in range(k, n)) + gamma ** (n - 1 - k) * final
        for k in range(n)
    ]


def test_discounted_returns_match_the_closed_form_loop():
    rng = random.Random(0)
    N, K = 7, 5
    n = [rng.randint(1, K) for _ in range(N)]
    r = [[rng.uniform(-1, 1) for _ in range(K)] for _ in range(N)]
    final = [rng.uniform(-1, 2) for _ in range(N)]
    for gamma in (1.0, 0.9, 0.3):
        out = discounted_returns(torch.tensor(r), torch.tensor(final), torch.tensor(n), gamma)
        for i in range(N):
            ref = _loop_returns([float(torch.tensor(x)) for x in r[i][: n[i]]], final[i], gamma)
            ref = [*ref, *[0.0] * (K - n[i])]
            torch.testing.assert_close(out[i], torch.tensor(ref, dtype=torch.float64))


def test_progress_turn_rewards_hand_values():
    # F = 1, p = [0.25, none, 0.75]: [0.25, 0 (p carried over), 1 - 0.25]
    # F = 2, p = [0.5, 0.3 (a regression), 1.5 (clamped to 1)]: [1.0, -0.4, 2 * (1 - 0.3)]
    # F = 3, one turn, nothing reported: the whole F on it
    p = torch.tensor([[0.25, NAN, 0.75], [0.5, 0.3, 1.5], [NAN, NAN, NAN]])
    out = progress_turn_rewards(torch.tensor([1.0, 2.0, 3.0]), p, torch.tensor([3, 3, 1]))
    expected = torch.tensor([[0.25, 0.0, 0.75], [1.0, -0.4, 1.4], [3.0, 0.0, 0.0]]).double()
    torch.testing.assert_close(out, expected)


def _loop_progress(final: float, p: list[float | None]) -> list[float]:
    """The literal rule: F (p_k - p_{k-1}) per turn, plus F (1 - p_last) on the last one."""
    out, prev, cur = [], 0.0, 0.0
    for v in p:
        cur = prev if v is None else min(max(v, 0.0), 1.0)
        out.append(final * (cur - prev))
        prev = cur
    out[-1] += final * (1.0 - cur)
    return out


def test_progress_turn_rewards_match_loop_and_sum_to_the_final_reward():
    rng = random.Random(1)
    N, K = 9, 4
    n = [rng.randint(1, K) for _ in range(N)]
    p = [[None if rng.random() < 0.3 else rng.uniform(-0.2, 1.2) for _ in range(K)] for _ in n]
    final = [rng.uniform(-1, 2) for _ in range(N)]
    tp = torch.tensor([[NAN if v is None else v for v in row] for row in p], dtype=torch.float64)
    out = progress_turn_rewards(torch.tensor(final, dtype=torch.float64), tp, torch.tensor(n))
    for i in range(N):
        ref = [*_loop_progress(final[i], p[i][: n[i]]), *[0.0] * (K - n[i])]
        torch.testing.assert_close(out[i], torch.tensor(ref, dtype=torch.float64))
        assert float(out[i].sum()) == pytest.approx(final[i])


def test_turn_returns_per_credit_mode_hand_values():
    # R = F + sum r: episode 0 has R = 1.5 (r = [0, 0.5, 0], so F = 1), progress [0.25, -, 0.75]
    R = torch.tensor([1.5, 0.0])
    r = torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.25, NAN, 0.75], [NAN, NAN, NAN]], dtype=torch.float64)
    n = torch.tensor([3, 2])
    ep = turn_returns(R, r, p, n, "episode", gamma=0.9)
    torch.testing.assert_close(ep, torch.tensor([[1.5, 1.5, 1.5], [0.0, 0.0, 0.0]]).double())
    rtg = turn_returns(R, r, p, n, "return_to_go", gamma=0.9)
    torch.testing.assert_close(rtg, torch.tensor([[1.26, 1.4, 1.0], [0.0, 0.0, 0.0]]).double())
    # progress: r + r' = [0.25, 0.5, 0.75]; G_2 = 0.75, G_1 = 0.5 + 0.9 * 0.75 = 1.175,
    # G_0 = 0.25 + 0.9 * 1.175 = 1.3075
    pr = turn_returns(R, r, p, n, "progress", gamma=0.9)
    torch.testing.assert_close(pr, torch.tensor([[1.3075, 1.175, 0.75], [0.0, 0.0, 0.0]]).double())
    # with gamma = 1 every mode's first-turn return is the episode reward
    for credit in CREDIT_MODES:
        torch.testing.assert_close(turn_returns(R, r, p, n, credit)[:, 0], R.double())
    with pytest.raises(ValueError, match="credit='turn' is not valid"):
        turn_returns(R, r, p, n, "turn")
    with pytest.raises(ValueError, match=r"gamma=0 must be in \(0, 1\]"):
        turn_returns(R, r, p, n, "return_to_go", gamma=0)


# -------------------------------------------------------------------------- advantages


def _hand_group() -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    """One group of 3 episodes, gamma = 0.9: (a) 3 turns, r = [0, 0.5, 0], F = 1 -> returns
    [1.26, 1.4, 1.0]; (b) 2 turns, no rewards, F = 0 -> [0, 0]; (c) 1 turn, F = 1 -> [1]."""
    returns = [[1.26, 1.4, 1.0], [0.0, 0.0], [1.0]]
    padded = torch.tensor([[[*g, *[0.0] * (3 - len(g))] for g in returns]], dtype=torch.float64)
    return padded, torch.tensor([[3, 2, 1]]), returns


def test_three_turn_group_hand_advantages_grpo_rloo_dr_grpo():
    padded, n, returns = _hand_group()
    valid = torch.ones(1, 3, dtype=torch.bool)
    g0 = [g[0] for g in returns]  # [1.26, 0, 1]
    mu, sd = sum(g0) / 3, statistics.stdev(g0)
    others = [(sum(g0) - x) / 2 for x in g0]  # rloo: mean of the other episodes' G_0
    expected = {
        "grpo": [[(x - mu) / (sd + EPS) for x in g] for g in returns],
        "dr_grpo": [[x - mu for x in g] for g in returns],
        "rloo": [[x - b for x in g] for g, b in zip(returns, others, strict=True)],
    }
    for estimator, exp in expected.items():
        out = turn_advantages(padded, n, valid, estimator, eps=EPS)
        assert out.dtype == torch.float32 and out.shape == (1, 3, 3)
        for i, row in enumerate(exp):
            torch.testing.assert_close(out[0, i, : len(row)], torch.tensor(row))
            assert out[0, i, len(row) :].eq(0).all()
    # rloo by hand: a's turns minus (0 + 1) / 2, b's minus (1.26 + 1) / 2, c's minus 1.26 / 2
    rloo = turn_advantages(padded, n, valid, "rloo")
    torch.testing.assert_close(rloo[0, 0], torch.tensor([0.76, 0.9, 0.5]))
    torch.testing.assert_close(rloo[0, 1, :2], torch.tensor([-1.13, -1.13]))
    torch.testing.assert_close(rloo[0, 2, :1], torch.tensor([0.37]))


def test_invalid_episodes_and_flat_groups_get_zero_on_every_turn():
    padded, n, _ = _hand_group()
    valid = torch.tensor([[True, False, True]])
    out = turn_advantages(padded, n, valid, "grpo")
    assert out[0, 1].eq(0).all()
    mu, sd = (1.26 + 1.0) / 2, statistics.stdev([1.26, 1.0])
    torch.testing.assert_close(
        out[0, 0], torch.tensor([(x - mu) / (sd + EPS) for x in (1.26, 1.4, 1)])
    )
    # equal first-turn returns: a flat group, 0 everywhere though later turns differ
    flat = torch.tensor([[[1.0, 2.0], [1.0, 0.0]]], dtype=torch.float64)
    for est in ("grpo", "dr_grpo", "rloo"):
        zero = turn_advantages(flat, torch.tensor([[2, 2]]), torch.ones(1, 2, dtype=bool), est)
        assert zero.eq(0).all()


@pytest.mark.parametrize("estimator", SEQUENCE_ESTIMATORS)
@pytest.mark.parametrize("credit", CREDIT_MODES)
def test_gamma_one_without_turn_rewards_is_the_episode_advantage_bit_for_bit(estimator, credit):
    gen = torch.Generator().manual_seed(3)
    P, G, K = 4, 5, 4
    rewards = torch.randint(0, 3, (P, G), generator=gen).float() / 2 + 0.1
    rewards[0] = 0.5  # a flat group
    valid = torch.rand(P, G, generator=gen) > 0.2
    lengths = torch.randint(1, 40, (P, G), generator=gen).float()
    n = torch.randint(1, K + 1, (P * G,), generator=gen)
    garbage = torch.rand(P * G, K, generator=gen, dtype=torch.float64)
    turn_r = torch.where(torch.arange(K) < n.unsqueeze(-1), 0.0, garbage)  # padded: ignored
    progress = torch.full((P * G, K), NAN, dtype=torch.float64)  # nothing reported
    returns = turn_returns(rewards.reshape(-1), turn_r, progress, n, credit)
    out = turn_advantages(returns.reshape(P, G, K), n.reshape(P, G), valid, estimator, EPS, lengths)
    seq = sequence_advantages(rewards, valid, estimator, eps=EPS, lengths=lengths)
    inside = (torch.arange(K) < n.reshape(P, G).unsqueeze(-1)).float()
    assert torch.equal(out, seq.unsqueeze(-1) * inside)


def test_turn_rewards_with_gamma_one_keep_the_first_turn_at_the_episode_advantage():
    # R = F + sum r, so G_0 = R: turn 0 keeps the episode advantage, later turns lose earlier r
    R = torch.tensor([[1.5, 0.2, 1.0, 0.0]])
    r = torch.tensor([[0.5, 0.0], [0.2, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    n = torch.tensor([2, 1, 2, 1])
    ret = turn_returns(R.reshape(-1), r, torch.full((4, 2), NAN), n, "return_to_go")
    torch.testing.assert_close(
        ret, torch.tensor([[1.5, 1.0], [0.2, 0], [1.0, 1.0], [0, 0]]).double()
    )
    out = turn_advantages(
        ret.reshape(1, 4, 2), n.reshape(1, 4), torch.ones(1, 4, dtype=bool), "grpo"
    )
    seq = sequence_advantages(R, torch.ones(1, 4, dtype=bool), "grpo")
    torch.testing.assert_close(out[0, :, 0], seq[0])
    mu, sd = statistics.fmean([1.5, 0.2, 1.0, 0.0]), statistics.stdev([1.5, 0.2, 1.0, 0.0])
    assert float(out[0, 0, 1]) == pytest.approx((1.0 - mu) / (sd + EPS), rel=1e-6)


# -------------------------------------------------------------------- entropy per turn


def test_turn_entropy_modulation_matches_loop():
    k = 0.8
    turn = torch.tensor([[-1, 0, 0, 0, 1, 1], [-1, -1, 0, 0, 1, -1]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 0, 0]])  # sample 1's turn 1: no tokens
    ent = torch.tensor([[9.0, 0.2, 0.6, 5.0, 1.0, 2.0], [9.0, 9.0, 0.1, 0.3, 4.0, 9.0]])
    adv = torch.tensor([[0.0, 1.0, 1.0, 1.0, -2.0, -2.0], [0.0, 0.0, 0.5, 0.5, 0.5, 0.0]])
    # turn means over masked tokens: (0,0): 0.4, (0,1): 1.5, (1,0): 0.2; (1,1) has none
    hbar = {(0, 0): 0.4, (0, 1): 1.5, (1, 0): 0.2}
    mean = sum(math.exp(-k * h) for h in hbar.values()) / 3
    expected = torch.zeros(2, 6)
    for i in range(2):
        for t in range(6):
            if mask[i, t]:
                g = math.exp(-k * hbar[(i, int(turn[i, t]))]) / mean
                expected[i, t] = adv[i, t] * g
    out = turn_entropy_modulation(adv, ent, mask, turn, k)
    torch.testing.assert_close(out, expected)
    half = turn_entropy_modulation(adv, ent, mask, turn, k, step_mean=2 * mean)
    torch.testing.assert_close(half, expected / 2)


# ------------------------------------------------- Episode -> Rollout -> token advantages


def _episode() -> Episode:
    """3 + 2 + 0 + 1 sampled tokens: an observation (2 ids) after turn 0, none after turn 1 (an
    empty render), and turn 2 sampled nothing. Runs of mask 1 would merge turns 1 and 3 and
    miss turn 2; the explicit turn index does not."""
    ep = Episode(env=None, messages=[], prompt_ids=[11, 12, 13])  # type: ignore[arg-type]
    ep.ids = [21, 22, 23, 91, 92, 31, 32, 41]
    ep.mask = [1, 1, 1, 0, 0, 1, 1, 1]
    ep.logprobs = [-0.1, -0.2, -0.3, 0.0, 0.0, -0.4, -0.5, -0.6]
    ep.turn_versions, ep.turn_lengths = [0, 0, 0, 0], [3, 2, 0, 1]
    ep.turn_rewards, ep.turn_progress = [None, 0.5, None, 0.0], [0.2, None, None, 1.0]
    ep.texts, ep.end = ["a", "b", "", "c"], "done"
    return ep


def test_episode_rollout_carries_turn_index_rewards_and_progress():
    r = episode_rollout(_episode(), 0)
    assert r.turn_index == [0, 0, 0, 0, 0, 1, 1, 3]
    assert r.turn_rewards == (None, 0.5, None, 0.0)
    assert r.turn_progress == (0.2, None, None, 1.0)
    rewards, progress, n = turn_tensors([Sample(r, 1.5, True)])
    assert n.tolist() == [4] and rewards.tolist() == [[0.0, 0.5, 0.0, 0.0]]
    assert progress[0, 0] == 0.2 and progress[0, 3] == 1.0 and progress[0, 1:3].isnan().all()


def test_turn_advantages_reach_the_right_tokens():
    ep_rollout = episode_rollout(_episode(), 0)
    single = episode_rollout(_episode(), 0)
    single.turn_index, single.turn_rewards, single.turn_progress = None, (), ()
    samples = [Sample(ep_rollout, 1.5, True), Sample(single, 0.0, True)]
    t = sequences_to_tensors(samples, torch.zeros(2), pad_id=0)
    idx = turn_index_tensor(samples, t["mask"].shape[1])
    # targets of completion token j sit at position len(prompt) - 1 + j = 2 + j
    assert idx[0].tolist() == [-1, -1, 0, 0, 0, 0, 0, 1, 1, 3]
    assert idx[1].tolist() == [-1, -1, 0, 0, 0, 0, 0, 0, 0, 0]
    turn_adv = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 0.0, 0.0]])
    out = turn_token_advantages(turn_adv, idx)
    assert out[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 2, 2, 4]
    assert out[1].tolist() == [0, 0, *[-1.0] * 8]
    assert t["mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 1, 1, 1]  # observations: mask 0


# ----------------------------------------------------------------- environments, config


def test_guess_number_reports_log_scale_interval_progress():
    env = make_environment("guess_number", {})
    env.reset({"prompt": "Guess my number from 1 to 16.", "secret": 11, "high": 16})
    results = [env.step(Turn(text=g)) for g in ("8", "no number", "12", "10", "11")]
    # numbers left after each hint: [9, 16] -> 8, still 8, [9, 11] -> 3, [11, 11] -> 1, found -> 0
    left = [8, 8, 3, 1, 0]
    assert [r.progress for r in results] == pytest.approx(
        [1 - math.log(m + 1) / math.log(17) for m in left]
    )
    assert results[-1].progress == 1.0 and results[-1].done and env.final_reward() == 1.0
    assert interval_progress(1, 16, 16, solved=False) == 0.0
    assert all(r.reward is None for r in results)  # the rewards are unchanged


ENV = ("env.name=guess_number", "data.source=env")
PROGRESS = (*ENV, "advantage.credit=progress")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["advantage.credit=turnwise"], "advantage.credit: 'turnwise' is not one of episode, "),
        (["advantage.credit=return_to_go"], "advantage.credit=return_to_go .* needs env.name"),
        ([*PROGRESS, "train.algorithm=rebel"], "credit=progress needs train.algorithm=grpo"),
        ([*PROGRESS, "advantage.turn_discount=0"], r"turn_discount=0.0 must be in \(0, 1\]"),
        ([*PROGRESS, "advantage.turn_discount=1.5"], r"turn_discount=1.5 must be in \(0, 1\]"),
        (["advantage.turn_discount=0.9"], "0.9 has no effect with advantage.credit=episode"),
        (["advantage.entropy_modulation_level=turn"], "needs advantage.entropy_modulation"),
        (["advantage.entropy_modulation_level=step"], "'step' is not one of token, turn"),
    ],
)
def test_config_refuses_turn_credit_misuse(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_accepts_turn_credit_with_an_environment():
    cfg = load_config(
        None,
        [
            *ENV,
            "advantage.credit=progress",
            "advantage.turn_discount=0.95",
            "advantage.entropy_modulation=1.0",
            "advantage.entropy_modulation_level=turn",
        ],
    )
    assert cfg.advantage.credit == "progress" and cfg.advantage.turn_discount == 0.95
