"""Rollout/trainer mismatch corrections (posttrain/off_policy.py) against hand values and plain
Python loops; their config rules; their wiring into the GRPO loss and the metric reduction."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain import losses
from posttrain.algorithms.base import add_shares, reduce_shares
from posttrain.algorithms.grpo import clipped_policy_loss
from posttrain.algorithms.online import mismatch_shares
from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.off_policy import (
    ROLLOUT_CORRECTIONS,
    geo_mask,
    icepop_mask,
    log_ratio,
    mismatch_stats,
    rollout_correction,
    seq_mis_weights,
    tis_weights,
    token_mis_weights,
)

L3, L15 = math.log(3.0), math.log(1.5)


def _close(x, expected, atol=1e-6):
    torch.testing.assert_close(x, torch.tensor(expected, dtype=x.dtype), atol=atol, rtol=0)


def _from_d(d, mask):
    """(logp_old, logp_roll, mask) whose log-ratio logp_old - logp_roll is `d`."""
    roll = torch.full((len(d), len(d[0])), -2.0)
    return roll + torch.tensor(d), roll, torch.tensor(mask, dtype=torch.bool)


def _random(seed=0, scale=0.6):
    """Random [5, 7] log-probs, a ragged mask (row 1 all padding) and NaN on the padding."""
    B, T = 5, 7
    g = torch.Generator().manual_seed(seed)
    roll = -torch.rand(B, T, generator=g) * 3
    old = roll + torch.randn(B, T, generator=g) * scale
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0
    mask = torch.arange(T) < lengths[:, None]
    nan = torch.tensor(float("nan"))
    return torch.where(mask, old, nan), torch.where(mask, roll, nan), mask


# ----------------------------------------------------------------------------- hand values


def test_tis_weights_moved_and_reexported():
    assert losses.tis_weights is tis_weights
    old, roll, mask = _from_d([[0.0, 1.0, -0.5, 3.0]], [[1, 1, 1, 0]])
    w, st = tis_weights(old, roll, mask, cap=2.0)
    _close(w, [[1.0, 2.0, math.exp(-0.5), 0.0]])
    assert (st["capped_count"].item(), st["token_count"].item()) == (1.0, 3.0)


def test_token_mis_hand_values():
    # r = 1, e, e^-0.5, 1.5, (padding); C = 2 drops the e token only, keeps the others' ratios
    old, roll, mask = _from_d([[0.0, 1.0, -0.5, L15, 5.0]], [[1, 1, 1, 1, 0]])
    w, keep = token_mis_weights(old, roll, mask, 2.0)
    _close(w, [[1.0, 0.0, math.exp(-0.5), 1.5, 0.0]])
    _close(keep, [[1.0, 0.0, 1.0, 1.0, 0.0]])


def test_seq_mis_hand_values():
    d = [[0.2, 0.3, 9.0], [0.5, 0.4, 0.0], [-1.0, 0.3, 0.2], [4.0, 4.0, 4.0]]
    mask = [[1, 1, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]]
    w, keep = seq_mis_weights(*_from_d(d, mask), 2.0)
    r0, r2 = math.exp(0.5), math.exp(-0.5)  # row 1: e^0.9 = 2.46 > 2, dropped whole
    _close(w, [[r0, r0, 0.0], [0.0, 0.0, 0.0], [r2, r2, r2], [0.0, 0.0, 0.0]], atol=1e-5)
    _close(keep, [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


def test_icepop_hand_values():
    # k = 2: the band is [0.5, 2]; r = 1, 3, 1/3, 1.9, 0.55, (padding 1)
    d = [[0.0, L3, -L3, math.log(1.9), math.log(0.55), 0.0]]
    mask = icepop_mask(*_from_d(d, [[1, 1, 1, 1, 1, 0]]), 2.0)
    _close(mask, [[1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])


def test_geo_mask_hand_values():
    # k = 1.5, band [2/3, 1.5]: geometric means e^0.3 (kept; the product e^0.6 would not be),
    # e^0.5 (dropped), e^-0.6 (dropped), e^0 (kept: two extreme tokens that cancel), padding
    d = [[0.3, 0.3, 7.0], [0.5, 0.5, 0.5], [-0.6, 0.0, 0.0], [2.0, -2.0, 0.0], [3.0, 3.0, 3.0]]
    mask = [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]
    m = geo_mask(*_from_d(d, mask), 1.5)
    _close(m, [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0] * 3])


def test_mismatch_stats_hand_values():
    old, roll, mask = _from_d([[0.5, -1.0, 7.0]], [[1, 1, 0]])
    st = mismatch_stats(old, roll, mask)
    assert st["mismatch_abs_sum"].item() == pytest.approx(1.5)
    assert st["mismatch_abs_max"].item() == pytest.approx(1.0)
    # k3 of KL(roll || train) per token: exp(d) - 1 - d
    k3 = (math.exp(0.5) - 1.5) + (math.exp(-1.0) - 1.0 + 1.0)
    assert st["mismatch_k3_sum"].item() == pytest.approx(k3, rel=1e-6)
    assert st["token_count"].item() == 2.0
    # near 0 the k3 term is d^2/2 + d^3/6 (no cancellation: computed as expm1(d) - d in float64)
    d = 1e-3
    small = mismatch_stats(*_from_d([[d]], [[1]]))["mismatch_k3_sum"].item()
    dd = float((torch.tensor(-2.0) + d) - torch.tensor(-2.0))  # the float32 d the function sees
    assert small == pytest.approx(dd**2 / 2 + dd**3 / 6, rel=1e-6)
    empty = mismatch_stats(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3))
    assert empty["mismatch_abs_max"].item() == 0.0


# ----------------------------------------------------------------------------- against loops


@pytest.mark.parametrize("seed", range(4))
def test_sequence_level_functions_match_a_loop(seed):
    old, roll, mask = _random(seed=seed)
    C, k = 1.8, 1.3
    w, keep = seq_mis_weights(old, roll, mask, C)
    g = geo_mask(old, roll, mask, k)
    B, T = mask.shape
    for i in range(B):
        ds = [float(old[i, t]) - float(roll[i, t]) for t in range(T) if mask[i, t]]
        R = math.exp(sum(ds))
        geo = math.exp(sum(ds) / len(ds)) if ds else 1.0
        for t in range(T):
            on = bool(mask[i, t])
            assert w[i, t].item() == pytest.approx(R if on and R <= C else 0.0, rel=1e-5)
            assert keep[i, t].item() == float(on and R <= C)
            assert g[i, t].item() == float(on and 1 / k <= geo <= k)


@pytest.mark.parametrize("seed", range(4))
def test_token_level_functions_match_a_loop(seed):
    old, roll, mask = _random(seed=seed)
    C = 1.5
    w, keep = token_mis_weights(old, roll, mask, C)
    ice = icepop_mask(old, roll, mask, C)
    B, T = mask.shape
    for i in range(B):
        for t in range(T):
            on = bool(mask[i, t])
            r = math.exp(float(old[i, t]) - float(roll[i, t])) if on else 0.0
            assert w[i, t].item() == pytest.approx(r if on and r <= C else 0.0, rel=1e-5)
            assert keep[i, t].item() == float(on and r <= C)
            assert ice[i, t].item() == float(on and 1 / C <= r <= C)


@pytest.mark.parametrize("method", ROLLOUT_CORRECTIONS)
def test_rollout_correction_composes_and_counts(method):
    old, roll, mask = _random(seed=11)
    k, cap = 1.4, 1.2
    w, st = rollout_correction(old, roll, mask, method, threshold=k, tis_cap=cap)
    tis, _ = tis_weights(old, roll, mask, cap)
    expected = {
        "tis": tis,
        "none": None,
        "token_mis": token_mis_weights(old, roll, mask, k)[0],
        "seq_mis": seq_mis_weights(old, roll, mask, k)[0],
        "icepop": icepop_mask(old, roll, mask, k),
        "icepop_tis": icepop_mask(old, roll, mask, k) * tis,
        "geo_mask": geo_mask(old, roll, mask, k),
        "geo_mask_tis": geo_mask(old, roll, mask, k) * tis,
    }[method]
    if expected is None:
        assert w is None
    else:
        assert torch.equal(w, expected)
        assert w.dtype == torch.float32 and not w.requires_grad
    # masked counts by a loop: a loss token is dropped when the method's mask is 0 there
    keep = {
        "token_mis": token_mis_weights(old, roll, mask, k)[1],
        "seq_mis": seq_mis_weights(old, roll, mask, k)[1],
        "icepop": icepop_mask(old, roll, mask, k),
        "icepop_tis": icepop_mask(old, roll, mask, k),
        "geo_mask": geo_mask(old, roll, mask, k),
        "geo_mask_tis": geo_mask(old, roll, mask, k),
    }.get(method, mask.float())
    dropped = [[bool(mask[i, t]) and keep[i, t] == 0 for t in range(7)] for i in range(5)]
    assert st["masked_token_count"].item() == sum(map(sum, dropped))
    assert st["masked_seq_count"].item() == sum(any(row) for row in dropped)
    assert st["seq_count"].item() == 4.0  # row 1 has no loss token
    capped = ((torch.exp(log_ratio(old, roll, mask)) > cap) & mask).sum().item()
    assert st["capped_count"].item() == (capped if method.endswith("tis") else 0.0)
    if method in ("token_mis", "seq_mis", "icepop", "geo_mask"):
        assert st["masked_token_count"].item() > 0, "the example must exercise the mask"


def test_tis_off_and_bad_method():
    old, roll, mask = _random(seed=3)
    w, st = rollout_correction(old, roll, mask, "tis", threshold=2.0, tis_cap=None)
    assert w is None and st["masked_token_count"].item() == 0.0
    w, _ = rollout_correction(old, roll, mask, "geo_mask_tis", threshold=1.1, tis_cap=None)
    assert torch.equal(w, geo_mask(old, roll, mask, 1.1))
    with pytest.raises(ValueError, match=r"^method='mis' is not valid; choose one of tis, none"):
        rollout_correction(old, roll, mask, "mis", threshold=2.0, tis_cap=2.0)


@pytest.mark.parametrize("method", ROLLOUT_CORRECTIONS)
def test_padding_and_dtype_invariance(method):
    """Extra padded columns (NaN or huge log-probs there, inputs with grad): the same weights
    on the real columns, 0 on the padded ones, the same stats; nothing carries gradient.
    float64 inputs give the same float32 weights."""
    old, roll, mask = _random(seed=5)
    kw = {"threshold": 1.3, "tis_cap": 1.5}
    w, st = rollout_correction(old, roll, mask, method, **kw)

    def pad(x, value):
        return torch.cat([x, torch.full((x.shape[0], 3), value, dtype=x.dtype)], dim=1)

    old_g = pad(old, 50.0).requires_grad_()
    w_p, st_p = rollout_correction(old_g, pad(roll, float("nan")), pad(mask, False), method, **kw)
    if w is None:
        assert w_p is None
    else:
        assert not w_p.requires_grad
        torch.testing.assert_close(w_p[:, :7], w)
        assert (w_p[:, 7:] == 0).all() and (w[~mask] == 0).all()
    assert {k: v.item() for k, v in st_p.items()} == {k: v.item() for k, v in st.items()}
    w64, _ = rollout_correction(old.double(), roll.double(), mask, method, **kw)
    if w is not None:
        assert w64.dtype == torch.float32
        assert torch.equal(w64, w)


# ----------------------------------------------------------------------------- config


def test_config_defaults_keep_tis():
    cfg = load_config(None, [])
    assert cfg.loss.rollout_correction == "tis" and cfg.loss.tis_cap == 2.0
    assert cfg.loss.rollout_correction_threshold == 2.0
    load_config(None, ["loss.tis_cap=null"])  # TIS off, as before
    for method in ROLLOUT_CORRECTIONS:
        load_config(None, [f"loss.rollout_correction={method}"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["loss.rollout_correction=mis"],
            r"^loss\.rollout_correction: 'mis' is not one of tis, none, token_mis, seq_mis, "
            r"icepop, icepop_tis, geo_mask, geo_mask_tis$",
        ),
        (
            ["loss.rollout_correction_threshold=1.0"],
            r"^loss\.rollout_correction_threshold=1\.0 must be > 1",
        ),
        (
            ["loss.rollout_correction=geo_mask_tis", "loss.tis_cap=null"],
            r"^loss\.rollout_correction=geo_mask_tis multiplies its mask by the TIS weight: set "
            r"loss\.tis_cap \(>= 1\), or use geo_mask for the mask alone$",
        ),
        (
            ["train.algorithm=rebel", "loss.rollout_correction=icepop"],
            r"^train\.algorithm=rebel cannot use loss\.rollout_correction=icepop",
        ),
    ],
)
def test_config_refuses(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# ----------------------------------------------------------------------------- wiring, metrics


def _micro_batch(seed=0, d=None):
    """A GRPO micro-batch of 4 samples x 5 positions: logits, and rollout log-probs off by `d`
    [4, 5] (random when None) from the trainer's."""
    g = torch.Generator().manual_seed(seed)
    B, L, V = 4, 6, 5
    input_ids = torch.randint(0, V, (B, L), generator=g)
    logits = torch.randn(B, L, V, generator=g)
    mask = torch.tensor(
        [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.float
    )
    logp = losses.token_logprobs(logits[:, :-1], input_ids[:, 1:])
    d = torch.randn(B, L - 1, generator=g) * 0.4 if d is None else d
    mb = {
        "input_ids": input_ids,
        "mask": mask,
        "adv": torch.tensor([[1.0], [-0.5], [2.0], [-1.0]]).expand(B, L - 1).clone(),
        "logp_roll": logp - d,
    }
    return SimpleNamespace(logits=logits), mb


def _cfg(*extra):
    return load_config(None, ["rollout.temperature=1.0", *extra])


def test_a_dropped_sample_leaves_the_loss_like_a_zero_advantage():
    # every token of sample i off by the same d_i: geometric means e^0.01, e^0.3, e^-0.02, e^-0.4;
    # k = 1.1 (log k = 0.095) keeps samples 0 and 2
    out, mb = _micro_batch(d=torch.tensor([[0.01], [0.3], [-0.02], [-0.4]]).expand(4, 5))
    cfg = _cfg("loss.rollout_correction=geo_mask", "loss.rollout_correction_threshold=1.1")
    kept = torch.tensor([True, False, True, False])
    loss, shares = clipped_policy_loss(cfg, out, mb, 12.0, 12.0, 0.0, seq_total=4.0)
    plain = dict(mb, adv=mb["adv"] * kept[:, None])
    expected, _ = clipped_policy_loss(
        _cfg("loss.rollout_correction=none"), out, plain, 12.0, 12.0, 0.0
    )
    torch.testing.assert_close(loss, expected)
    assert shares["tis/masked_seq_frac"] == (4 - int(kept.sum())) / 4.0
    assert "tis/capped_frac" not in shares


def test_metric_shares_over_micro_batches_equal_the_whole_batch():
    out, mb = _micro_batch(seed=1)
    cfg = _cfg("loss.rollout_correction=icepop", "loss.rollout_correction_threshold=1.3")
    n_tok, n_seq = float(mb["mask"].sum()), 4.0
    _, whole = clipped_policy_loss(cfg, out, mb, n_tok, n_tok, 0.0, seq_total=n_seq)
    totals: dict[str, float] = {}
    for rows in ([0, 1], [2, 3]):
        part = {k: v[rows] for k, v in mb.items()}
        _, shares = clipped_policy_loss(
            cfg, SimpleNamespace(logits=out.logits[rows]), part, n_tok, n_tok, 0.0, seq_total=n_seq
        )
        add_shares(totals, shares)
    summed = reduce_shares(totals, updates=1)
    assert summed.keys() == whole.keys()
    for key, value in whole.items():
        assert summed[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    # by hand: the max is a max (not the sum of the two micro-batches' maxima), fractions add up
    d = log_ratio(
        losses.token_logprobs(out.logits[:, :-1], mb["input_ids"][:, 1:]),
        mb["logp_roll"],
        mb["mask"],
    )
    on = mb["mask"].bool()
    assert whole["tis/mismatch_abs_max"] == pytest.approx(d[on].abs().max().item())
    r = d.exp()
    dropped = on & ((r < 1 / 1.3) | (r > 1.3))
    assert 0 < dropped.sum() < on.sum()
    assert whole["tis/masked_token_frac"] == pytest.approx(dropped.sum().item() / n_tok)
    assert whole["tis/masked_seq_frac"] == pytest.approx(dropped.any(-1).sum().item() / n_seq)
    k3 = (torch.expm1(d.double()) - d.double())[on].sum().item()
    assert whole["tis/mismatch_kl_k3"] == pytest.approx(k3 / n_tok, rel=1e-6)


def test_add_and_reduce_shares_max_and_sums():
    totals: dict[str, float] = {}
    add_shares(totals, {"a": 1.0, "tis/mismatch_abs_max": 0.3})
    add_shares(totals, {"a": 2.0, "tis/mismatch_abs_max": 0.1})
    add_shares(totals, {"a": 0.5, "tis/mismatch_abs_max": 0.2})
    assert totals == {"a": 3.5, "tis/mismatch_abs_max": 0.3}
    # two updates over the same batch: sums are averaged over the updates, the max is not
    assert reduce_shares(totals, updates=2) == {"a": 1.75, "tis/mismatch_abs_max": 0.3}


def test_mismatch_shares_without_masks():
    st = mismatch_stats(*_from_d([[0.5, -1.0]], [[1, 1]]))
    shares = mismatch_shares(st, token_total=4.0)
    assert shares["tis/mismatch_abs_mean"] == pytest.approx(1.5 / 4)
    assert shares["tis/mismatch_abs_max"] == pytest.approx(1.0)
    assert "tis/masked_token_frac" not in shares
