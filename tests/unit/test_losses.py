"""Tests for posttrain.losses against hand-computed values and naive python loops."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses import (
    AGGREGATION_MODES,
    AdaptiveKLController,
    adaptive_kl_update,
    aggregate,
    aggregation_denominator,
    kl_estimate,
    policy_loss,
    rebel_loss,
    rebel_pairs,
    tis_weights,
    token_entropy,
    token_logprobs,
    value_loss,
)

ATOL = 1e-5


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float() * scale


def _mask(lengths, width):
    return torch.tensor([[t < n for t in range(width)] for n in lengths])


def _close(t, expected, atol=ATOL):
    torch.testing.assert_close(t.float(), torch.tensor(expected), atol=atol, rtol=1e-5)


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- log-probs


def test_token_logprobs_matches_loop_with_temperature():
    logits = _rand(2, 3, 5, seed=1, scale=3)
    targets = torch.tensor([[0, 4, 2], [1, 1, 3]])
    for temp in (1.0, 0.7):
        out = token_logprobs(logits, targets, temperature=temp)
        assert out.dtype == torch.float32 and out.shape == (2, 3)
        for b in range(2):
            for t in range(3):
                z = [float(v) / temp for v in logits[b, t]]
                lse = math.log(sum(math.exp(v) for v in z))
                assert out[b, t].item() == pytest.approx(z[targets[b, t]] - lse, abs=ATOL)


def test_token_logprobs_bf16_input_and_ignore_index():
    logits = _rand(1, 2, 4, seed=2).bfloat16()
    out = token_logprobs(logits, torch.tensor([[2, -100]]))
    assert out.dtype == torch.float32
    assert out[0, 1].item() == 0.0
    ref = torch.log_softmax(logits.float(), -1)[0, 0, 2]
    assert out[0, 0].item() == pytest.approx(ref.item(), abs=ATOL)


def test_token_entropy_matches_loop():
    logits = _rand(2, 2, 6, seed=3, scale=2).half()
    for temp in (1.0, 1.5):
        out = token_entropy(logits, temperature=temp)
        assert out.dtype == torch.float32
        for b in range(2):
            for t in range(2):
                z = [float(v) / temp for v in logits[b, t]]
                s = sum(math.exp(v) for v in z)
                p = [math.exp(v) / s for v in z]
                h = -sum(pi * math.log(pi) for pi in p)
                assert out[b, t].item() == pytest.approx(h, abs=1e-4)
    assert token_entropy(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8), abs=ATOL)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), 0.0)


# ----------------------------------------------------------------------------- policy loss


def _naive_policy_loss(logp, old, adv, mask, lo, hi, c=None, level="token"):
    B, T = logp.shape
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        if level == "sequence":
            s = math.exp(sum(float(logp[b, t] - old[b, t]) for t in toks) / max(len(toks), 1))
        for t in toks:
            r = s if level == "sequence" else math.exp(float(logp[b, t] - old[b, t]))
            a = float(adv[b, t])
            rc = min(max(r, 1 - lo), 1 + hi)
            loss = -min(r * a, rc * a)
            if c is not None and a < 0:
                loss = min(loss, -c * a)
            out[b][t] = loss
    return torch.tensor(out)


def test_policy_loss_hand_values():
    logp = torch.log(torch.tensor([[1.5, 0.5, 5.0, 1.1]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[2.0, -1.0, -1.0, 1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, st = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    # r=1.5,A=2 -> -min(3, 2.4) = -2.4 ; r=.5,A=-1 -> -min(-.5,-.8) = .8
    # r=5,A=-1 -> 5 ; r=1.1,A=1 -> -1.1
    _close(loss, [[-2.4, 0.8, 5.0, -1.1]])
    assert st["clipped"].tolist() == [[True, True, False, False]]
    _close(st["ratio"], [[1.5, 0.5, 5.0, 1.1]])
    loss, st = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip_c=3.0)
    _close(loss, [[-2.4, 0.8, 3.0, -1.1]])
    assert st["dual_clipped"].tolist() == [[False, False, True, False]]


def test_policy_loss_clip_higher_asymmetric():
    logp = torch.log(torch.tensor([[1.25, 0.75]]))
    adv = torch.tensor([[1.0, -1.0]])
    loss, _ = policy_loss(
        logp, torch.zeros(1, 2), adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.28
    )
    _close(loss, [[-1.25, 0.8]])


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("c", [None, 3.0])
def test_policy_loss_matches_loop(level, c):
    B, T = 4, 6
    logp, old = _rand(B, T, seed=4, scale=0.4), _rand(B, T, seed=5, scale=0.4)
    adv = _rand(B, 1, seed=6).expand(B, T)
    mask = _mask([6, 3, 1, 0], T)
    lo, hi = (0.2, 0.28) if level == "token" else (0.03, 0.04)
    loss, st = policy_loss(
        logp, old, adv, mask, clip_low=lo, clip_high=hi, dual_clip_c=c, ratio_level=level
    )
    ref = _naive_policy_loss(logp, old, adv, mask, lo, hi, c, level)
    torch.testing.assert_close(loss, ref, atol=ATOL, rtol=1e-5)
    assert not st["clipped"][~mask].any()


def test_sequence_ratio_hand_value_and_padding():
    logp = torch.tensor([[0.1, 0.3, 7.0]])
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    _, st = policy_loss(
        logp, old, torch.ones(1, 3), mask, clip_low=1e-3, clip_high=1e-3, ratio_level="sequence"
    )
    assert st["ratio"][0, 0].item() == pytest.approx(math.exp(0.2), abs=ATOL)
    assert st["ratio"][0, 1].item() == pytest.approx(math.exp(0.2), abs=ATOL)


def test_policy_loss_gradient_zero_where_clipped():
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, 1.0]])
    loss, _ = policy_loss(
        logp, torch.zeros(1, 3), adv, torch.ones(1, 3), clip_low=0.2, clip_high=0.2
    )
    loss.sum().backward()
    # d(-r A)/d logp = -r A ; clipped token (r=1.5, A>0) has zero gradient
    _close(logp.grad, [[0.0, -1.1, -0.5]])


def test_policy_loss_padding_with_nan_is_ignored():
    logp = torch.tensor([[0.1, float("nan")]])
    loss, _ = policy_loss(
        logp,
        torch.zeros(1, 2),
        torch.ones(1, 2),
        torch.tensor([[1, 0]]),
        clip_low=0.2,
        clip_high=0.2,
    )
    assert torch.isfinite(loss).all() and loss[0, 1].item() == 0.0


def test_policy_loss_bad_options():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match=r"^ratio_level='seq'"):
        policy_loss(x, x, x, x, clip_low=0.2, clip_high=0.2, ratio_level="seq")
    with pytest.raises(ValueError, match=r"^dual_clip_c must be > 1"):
        policy_loss(x, x, x, x, clip_low=0.2, clip_high=0.2, dual_clip_c=0.5)


# ----------------------------------------------------------------------------- TIS / KL


def test_tis_weights_hand_values():
    old = torch.tensor([[0.0, 1.0, -0.5, 3.0]])
    roll = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    logp_old = old.clone().requires_grad_()
    w, st = tis_weights(logp_old, roll, mask, cap=2.0)
    assert not w.requires_grad
    _close(w, [[1.0, 2.0, math.exp(-0.5), 0.0]])
    assert st["mismatch_abs_sum"].item() == pytest.approx(1.5)
    assert st["capped_count"].item() == 1.0
    assert st["token_count"].item() == 3.0


def test_kl_estimators_hand_values():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    # d = logp - ref = [0.5, -1.0]
    _close(kl_estimate(logp, ref, "k1"), [[0.5, -1.0]])
    _close(kl_estimate(logp, ref, "k2"), [[0.125, 0.5]])
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    _close(kl_estimate(logp, ref, "k3"), [k3])
    assert (kl_estimate(_rand(3, 5, seed=7), _rand(3, 5, seed=8), "k3") >= 0).all()
    with pytest.raises(ValueError, match=r"^estimator='k4'"):
        kl_estimate(logp, ref, "k4")


# ----------------------------------------------------------------------------- aggregation


def _naive_aggregate(loss, mask, mode, max_len):
    rows = []
    for b in range(loss.shape[0]):
        toks = [float(loss[b, t]) for t in range(loss.shape[1]) if mask[b, t]]
        if toks:
            rows.append(toks)
    if mode == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    return sum(sum(r) / max_len for r in rows) / len(rows)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_matches_loop(mode):
    loss = _rand(5, 7, seed=9)
    mask = _mask([7, 2, 0, 5, 1], 7)
    den = aggregation_denominator(mask, mode)
    assert den == (15.0 if mode == "token_mean" else 4.0)
    got = aggregate(loss, mask, mode, den, max_new_tokens=8)
    assert got.item() == pytest.approx(_naive_aggregate(loss, mask, mode, 8), abs=ATOL)


def test_aggregate_hand_values():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(loss, mask, "token_mean", 4.0).item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq_mean_token_mean", 2.0).item() == pytest.approx((2 + 4) / 2)
    got = aggregate(loss, mask, "seq_mean_token_sum_norm", 2.0, max_new_tokens=5)
    assert got.item() == pytest.approx((6 / 5 + 4 / 5) / 2)
    with pytest.raises(ValueError):
        aggregate(loss, mask, "seq_mean_token_sum_norm", 2.0)
    with pytest.raises(ValueError, match=r"^mode='mean'"):
        aggregate(loss, mask, "mean", 2.0)
    assert aggregate(loss, torch.zeros(2, 3), "token_mean", 0.0).item() == 0.0


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_padding_invariance(mode):
    loss = _rand(3, 4, seed=10)
    mask = _mask([4, 2, 3], 4)
    den = aggregation_denominator(mask, mode)
    base = aggregate(loss, mask, mode, den, max_new_tokens=6)
    loss_pad = torch.cat([loss, torch.full((3, 5), float("nan"))], dim=1)
    mask_pad = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    # plus an all-padding row
    loss_pad = torch.cat([loss_pad, torch.full((1, 9), 7.0)])
    mask_pad = torch.cat([mask_pad, torch.zeros(1, 9, dtype=torch.bool)])
    assert aggregation_denominator(mask_pad, mode) == den
    got = aggregate(loss_pad, mask_pad, mode, den, max_new_tokens=6)
    assert got.item() == pytest.approx(base.item(), abs=ATOL)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_batch_order_invariance(mode):
    loss = _rand(6, 5, seed=11)
    mask = _mask([5, 1, 3, 0, 4, 2], 5)
    den = aggregation_denominator(mask, mode)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = aggregate(loss, mask, mode, den, 5)
    b = aggregate(loss[perm], mask[perm], mode, den, 5)
    assert a.item() == pytest.approx(b.item(), abs=ATOL)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("micro", [1, 3, 8])
def test_micro_batch_sum_equals_full_batch(mode, micro):
    loss = _rand(8, 6, seed=12)
    mask = _mask([6, 1, 4, 0, 2, 6, 3, 5], 6)
    full = aggregate(loss, mask, mode, aggregation_denominator(mask, mode), 6)
    chunks = list(zip(loss.split(micro), mask.split(micro), strict=True))
    den = aggregation_denominator([m for _, m in chunks], mode)
    total = sum(aggregate(lc, mc, mode, den, 6) for lc, mc in chunks)
    assert total.item() == pytest.approx(full.item(), abs=ATOL)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_micro_batch_gradients_match_1x8_vs_8x1(mode):
    """A linear 'model' producing logits: accumulated grads must not depend on micro-batching."""
    B, T, H, V = 8, 5, 4, 6
    feats = _rand(B, T, H, seed=13)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    mask = _mask([5, 2, 4, 1, 5, 3, 0, 2], T)
    adv = _rand(B, 1, seed=14).expand(B, T)
    w0 = _rand(H, V, seed=15, scale=0.3)
    with torch.no_grad():
        old = token_logprobs(feats @ w0, targets) + _rand(B, T, seed=16, scale=0.1)

    def grads(micro):
        w = w0.clone().requires_grad_()
        den = aggregation_denominator(list(mask.split(micro)), mode)
        for sl in torch.arange(B).split(micro):
            logp = token_logprobs(feats[sl] @ w, targets[sl])
            lt, _ = policy_loss(logp, old[sl], adv[sl], mask[sl], clip_low=0.2, clip_high=0.2)
            aggregate(lt, mask[sl], mode, den, max_new_tokens=T).backward()
        return w.grad

    g8 = grads(8)
    assert g8.abs().sum() > 0
    torch.testing.assert_close(grads(1), g8, atol=1e-6, rtol=1e-5)


def test_aggregation_denominator_list_and_empty_rows():
    m1 = _mask([3, 0], 4)
    m2 = _mask([1], 2)
    assert aggregation_denominator([m1, m2], "token_mean") == 4.0
    assert aggregation_denominator([m1, m2], "seq_mean_token_mean") == 2.0
    assert aggregation_denominator(m1.float(), "seq_mean_token_sum_norm") == 1.0


# ----------------------------------------------------------------------------- value loss


def test_value_loss_hand_values():
    v = torch.tensor([[1.0, 0.0, 2.0]])
    v_old = torch.tensor([[0.5, 0.1, 0.0]])
    g = torch.tensor([[0.0, 0.0, 5.0]])
    loss, _ = value_loss(v, v_old, g, torch.tensor([[1, 1, 0]]), clip_eps=0.2)
    # tok0: (1-0)^2=1, clip(1, .3, .7)=.7 -> .49 ; max=1 -> .5
    # tok1: 0, clip(0, -.1, .3) = 0 -> 0 ; tok2 masked
    _close(loss, [[0.5, 0.0, 0.0]])
    v2 = torch.tensor([[0.0]])
    loss2, _ = value_loss(v2, torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.ones(1, 1))
    # (0-.5)^2=.25 ; clip(0, .8, 1.2)=.8 -> .09 ; -> .125
    assert loss2.item() == pytest.approx(0.125)
    v3 = torch.tensor([[1.0]])
    loss3, _ = value_loss(v3, torch.tensor([[0.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1))
    # (1+1)^2=4 ; clip(1,-.2,.2)=.2 -> 1.44 ; max 4 -> 2
    assert loss3.item() == pytest.approx(2.0)
    loss4, st4 = value_loss(v3, torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1))
    # (1-2)^2=1 ; clip=.2 -> 3.24 -> 1.62, clipped branch chosen
    assert loss4.item() == pytest.approx(1.62) and st4["clipped"].item()
    loss5, _ = value_loss(v3, torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), None)
    assert loss5.item() == pytest.approx(0.5)


# ----------------------------------------------------------------------------- REBEL / KL ctl


def test_rebel_pairs_and_loss_match_loop():
    pairs = rebel_pairs(2, 3)
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2], [3, 4], [3, 5], [4, 5]]
    valid = torch.tensor([[True, False, True], [True, True, True]])
    assert rebel_pairs(2, 3, valid).tolist() == [[0, 2], [3, 4], [3, 5], [4, 5]]
    lp, lo, r = _rand(6, seed=17), _rand(6, seed=18), _rand(6, seed=19)
    eta = 0.5
    got = rebel_loss(lp, lo, r, eta, pairs)
    for k, (i, j) in enumerate(pairs.tolist()):
        d = ((float(lp[i]) - float(lo[i])) - (float(lp[j]) - float(lo[j]))) / eta
        ref = (d - (float(r[i]) - float(r[j]))) ** 2
        assert got[k].item() == pytest.approx(ref, abs=1e-4)


def test_adaptive_kl_controller():
    # (KL - target) / target = 0.5 -> clipped to 0.2 ; beta = 0.1 * (1 + 0.2 * 256 / 10000)
    assert adaptive_kl_update(0.1, 9.0, 6.0, 256, 10000) == pytest.approx(0.1 * (1 + 0.2 * 0.0256))
    # -0.5 -> -0.2 ; 0.05 not clipped
    assert adaptive_kl_update(0.1, 3.0, 6.0, 100, 100) == pytest.approx(0.08)
    assert adaptive_kl_update(0.1, 6.3, 6.0, 50, 100) == pytest.approx(0.1 * 1.025)
    ctl = AdaptiveKLController(0.2, target=1.0, horizon=10)
    assert ctl.update(2.0, 5) == pytest.approx(0.22)
    assert ctl.update(0.0, 5) == pytest.approx(0.22 * 0.9)
    assert ctl.beta == pytest.approx(0.198)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_and_tis_padding_and_order_invariance(level):
    B, T = 4, 5
    logp, old, roll = (_rand(B, T, seed=s, scale=0.3) for s in (20, 21, 22))
    adv = _rand(B, 1, seed=23).expand(B, T)
    mask = _mask([5, 2, 4, 0], T)
    kw = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": 3.0, "ratio_level": level}
    loss, st = policy_loss(logp, old, adv, mask, **kw)
    w, tis = tis_weights(old, roll, mask, 1.1)

    def pad(x, value):
        return torch.cat([x, torch.full((B, 3), value, dtype=x.dtype)], dim=1)

    mask_p = pad(mask, False)
    loss_p, st_p = policy_loss(pad(logp, 9.0), pad(old, -9.0), pad(adv, 5.0), mask_p, **kw)
    torch.testing.assert_close(loss_p[:, :T], loss)
    torch.testing.assert_close(st_p["ratio"][:, :T][mask], st["ratio"][mask])
    assert (loss_p[:, T:] == 0).all()
    w_p, tis_p = tis_weights(pad(old, 9.0), pad(roll, -9.0), mask_p, 1.1)
    torch.testing.assert_close(w_p[:, :T], w)
    assert {k: v.item() for k, v in tis_p.items()} == {k: v.item() for k, v in tis.items()}
    perm = torch.tensor([2, 0, 3, 1])
    loss_perm, _ = policy_loss(logp[perm], old[perm], adv[perm], mask[perm], **kw)
    torch.testing.assert_close(loss_perm, loss[perm])
