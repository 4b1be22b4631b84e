"""GAE, KL-shaped rewards and whitening on episode masks: the loss mask of a multi-turn episode
has gaps (observation tokens, mask 0) between its sampled turns. The recursion links each sampled
token to the next sampled token's value; contiguous masks give exactly the old results."""

from __future__ import annotations

import pytest
import torch

from posttrain.advantages import gae, kl_shaped_rewards, whiten

# rows with gaps: prompt positions, two or three sampled turns, observation runs, right padding
GAP_MASKS = torch.tensor(
    [
        [0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 0],
        [0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1],  # a one-token last turn at the final position
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # a masked (invalid) episode
        [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # a single-turn episode
        [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # one sampled token
    ]
)


def _loop_reference(
    r: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Python-float GAE per row over the sampled positions only, in order (V = 0 after the last)."""
    adv = torch.zeros(r.shape, dtype=torch.float64)
    ret = torch.zeros(r.shape, dtype=torch.float64)
    for i in range(r.shape[0]):
        idx = [j for j in range(r.shape[1]) if mask[i, j]]
        vals = [float(v[i, j]) for j in idx] + [0.0]
        running = 0.0
        for k in reversed(range(len(idx))):
            delta = float(r[i, idx[k]]) + gamma * vals[k + 1] - vals[k]
            running = delta + gamma * lam * running
            adv[i, idx[k]] = running
            ret[i, idx[k]] = running + vals[k]
    return adv, ret


def _old_gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verbatim copy of `advantages.gae` before episodes (contiguous masks only)."""

    def masked(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.where(m.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))

    m = mask.float()
    r = masked(token_rewards.float(), mask)
    v = masked(values.float(), mask)
    B, T = r.shape
    adv = torch.zeros_like(r)
    last = torch.zeros(B, dtype=r.dtype, device=r.device)
    for t in reversed(range(T)):
        if t + 1 < T:
            next_v, next_m = v[:, t + 1], m[:, t + 1]
        else:
            next_v = next_m = torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * next_m * last) * m[:, t]
        adv[:, t] = last
    return adv, masked(adv + v, mask)


def _random(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.7, 0.0)])
def test_gae_with_gaps_matches_the_sampled_token_loop(gamma, lam):
    r, v = _random(GAP_MASKS.shape, 0)
    adv, ret = gae(r, v, GAP_MASKS, gamma, lam)
    ref_adv, ref_ret = _loop_reference(r, v, GAP_MASKS, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32
    assert torch.allclose(adv.double(), ref_adv, atol=1e-5)
    assert torch.allclose(ret.double(), ref_ret, atol=1e-5)
    off = ~GAP_MASKS.bool()
    assert (adv[off] == 0).all() and (ret[off] == 0).all()
    # the old recursion cut the episode at its first observation token: the gap matters
    old_adv, _ = _old_gae(r, v, GAP_MASKS, gamma, lam)
    assert not torch.allclose(old_adv, adv, atol=1e-3)


def test_gae_hand_values_across_an_observation():
    # sampled a, b | observation o, o | sampled c; R = 1 on c; gamma 0.5, lam 0.5
    mask = torch.tensor([[1, 1, 0, 0, 1]])
    r = torch.tensor([[0.0, 0.0, 5.0, 5.0, 1.0]])  # the observations' "rewards" are ignored
    v = torch.tensor([[0.2, 0.4, 9.0, 9.0, 0.8]])  # and so are their values
    adv, ret = gae(r, v, mask, gamma=0.5, lam=0.5)
    d_c = 1.0 + 0.5 * 0.0 - 0.8  # 0.2
    d_b = 0.0 + 0.5 * 0.8 - 0.4  # 0.0: b bootstraps from V(c), not from the observation
    d_a = 0.0 + 0.5 * 0.4 - 0.2  # 0.0
    a_c = d_c
    a_b = d_b + 0.25 * a_c
    a_a = d_a + 0.25 * a_b
    expected = torch.tensor([[a_a, a_b, 0.0, 0.0, a_c]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, (expected + v) * mask, atol=1e-6)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_contiguous_masks_give_bit_identical_results_to_the_old_gae(gamma, lam, dtype):
    g = torch.Generator().manual_seed(4)
    B, T = 7, 23
    starts = torch.randint(0, 8, (B,), generator=g)
    lengths = torch.randint(0, T - 7, (B,), generator=g)
    pos = torch.arange(T)
    mask = (pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])
    mask[0] = pos >= 3  # a run up to the final position
    mask[1] = False  # no tokens
    r, v = (x.to(dtype) for x in _random((B, T), 5))
    for m in (mask, mask.float(), mask.long()):
        adv, ret = gae(r, v, m, gamma, lam)
        old_adv, old_ret = _old_gae(r, v, m, gamma, lam)
        assert torch.equal(adv, old_adv) and torch.equal(ret, old_ret)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8)])
def test_an_episode_row_equals_the_row_with_its_observations_deleted(gamma, lam):
    r, v = _random(GAP_MASKS.shape, 6)
    adv, ret = gae(r, v, GAP_MASKS, gamma, lam)
    for i in range(GAP_MASKS.shape[0]):
        m = GAP_MASKS[i].bool()
        first = int(m.nonzero()[0]) if m.any() else GAP_MASKS.shape[1]
        # keep the prompt positions before the first sampled token and every sampled token
        keep = torch.tensor([j < first or bool(m[j]) for j in range(m.numel())])
        short_adv, short_ret = gae(
            r[i : i + 1, keep], v[i : i + 1, keep], m[keep][None], gamma, lam
        )
        assert torch.equal(adv[i, m], short_adv[0, m[keep]])
        assert torch.equal(ret[i, m], short_ret[0, m[keep]])
        assert (short_adv[0, ~m[keep]] == 0).all()


def test_observation_values_and_rewards_never_reach_the_sampled_tokens():
    r, v = _random(GAP_MASKS.shape, 7)
    off = ~GAP_MASKS.bool()
    junk_r = torch.where(off, torch.full_like(r, float("nan")), r)
    junk_v = torch.where(off, torch.full_like(v, 1e30), v)
    adv, ret = gae(r, v, GAP_MASKS, 0.9, 0.8)
    adv_j, ret_j = gae(junk_r, junk_v, GAP_MASKS, 0.9, 0.8)
    assert torch.equal(adv, adv_j) and torch.equal(ret, ret_j)


def test_kl_shaped_rewards_on_an_episode_mask():
    g = torch.Generator().manual_seed(8)
    kl = torch.rand(GAP_MASKS.shape, generator=g)
    rewards = torch.tensor([1.0, -2.0, 3.0, 4.0, 0.5, -1.0])
    got = kl_shaped_rewards(rewards, kl, GAP_MASKS, beta=0.3)
    for i in range(GAP_MASKS.shape[0]):
        sampled = [j for j in range(GAP_MASKS.shape[1]) if GAP_MASKS[i, j]]
        for j in range(GAP_MASKS.shape[1]):
            expected = -0.3 * float(kl[i, j]) if j in sampled else 0.0
            if sampled and j == sampled[-1]:
                expected += float(rewards[i])
            assert float(got[i, j]) == pytest.approx(expected, abs=1e-6), (i, j)


def test_whiten_on_an_episode_mask_uses_only_the_sampled_tokens():
    x, _ = _random(GAP_MASKS.shape, 9)
    x = torch.where(GAP_MASKS.bool(), x, torch.full_like(x, 1e6))  # observations: huge values
    out = whiten(x, GAP_MASKS, eps=0.0)
    vals = x[GAP_MASKS.bool()].double()
    expected = (vals - vals.mean()) / vals.std(unbiased=True)
    assert torch.allclose(out[GAP_MASKS.bool()].double(), expected, atol=1e-5)
    assert (out[~GAP_MASKS.bool()] == 0).all()
