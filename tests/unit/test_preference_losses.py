"""The preference losses of posttrain.losses (DPO family, cDPO vs robust DPO, RPO, Bradley-Terry)
against their formulas, hand values and a naive loop."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses import bradley_terry_loss, preference_loss, rpo_nll
from tests.unit.test_losses import ATOL, _logsig

# ----------------------------------------------------------------------------- preference


def _l(h):
    """The sigmoid DPO loss l(h) = -log sigmoid(h)."""
    return -_logsig(h)


def _cdpo(h, eps):
    """cDPO: -(1 - eps) log sig(h) - eps log sig(-h)."""
    return -(1 - eps) * _logsig(h) - eps * _logsig(-h)


def _robust(h, eps):
    """Robust DPO (Chowdhury et al. 2024): ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps)."""
    return ((1 - eps) * _l(h) - eps * _l(-h)) / (1 - 2 * eps)


def _naive_pref(pw, pl, rw, rl, kind, beta, eps, gamma, nw, nl):
    if kind == "simpo":
        h = beta * pw / nw - beta * pl / nl - gamma
        return _cdpo(h, eps)
    if kind in ("ipo", "length_normalized"):
        pw, pl, rw, rl = pw / nw, pl / nl, rw / nw, rl / nl
    h = beta * ((pw - rw) - (pl - rl))
    if kind == "ipo":
        return (h / beta - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return max(0.0, 1 - h)
    if kind == "sigmoid":
        assert eps == 0
        return _l(h)
    if kind == "robust":
        return _robust(h, eps)
    return _cdpo(h, eps)  # cdpo, length_normalized


@pytest.mark.parametrize(
    ("kind", "eps"),
    [
        ("sigmoid", 0.0),
        ("cdpo", 0.1),
        ("cdpo", 0.0),
        ("robust", 0.2),
        ("robust", 0.0),
        ("ipo", 0.0),
        ("hinge", 0.0),
        ("simpo", 0.0),
        ("simpo", 0.1),
        ("length_normalized", 0.0),
        ("length_normalized", 0.1),
    ],
)
def test_preference_losses_match_formula(kind, eps):
    pw = torch.tensor([-10.0, -4.0, -30.0])
    pl = torch.tensor([-12.0, -3.0, -25.0])
    rw = torch.tensor([-11.0, -5.0, -28.0])
    rl = torch.tensor([-11.5, -2.0, -26.0])
    nw = torch.tensor([5.0, 2.0, 10.0])
    nl = torch.tensor([6.0, 3.0, 7.0])
    beta, gamma = 0.5, 0.3
    loss, met = preference_loss(pw, pl, rw, rl, kind, beta, eps, gamma, nw, nl)
    assert loss.shape == (3,)
    for i in range(3):
        args = (float(pw[i]), float(pl[i]), float(rw[i]), float(rl[i]))
        ref = _naive_pref(*args, kind, beta, eps, gamma, float(nw[i]), float(nl[i]))
        assert loss[i].item() == pytest.approx(ref, abs=ATOL)
    torch.testing.assert_close(met["margin"], met["rewards_chosen"] - met["rewards_rejected"])
    assert met["accuracy"].tolist() == (met["margin"] > 0).float().tolist()


def test_preference_metrics_hand_values():
    pw, pl = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rw, rl = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    loss, met = preference_loss(pw, pl, rw, rl, "sigmoid", 0.1)
    assert met["rewards_chosen"].tolist() == pytest.approx([0.1, 0.0])
    assert met["rewards_rejected"].tolist() == pytest.approx([-0.1, 0.1])
    assert met["margin"].tolist() == pytest.approx([0.2, -0.1])
    assert met["accuracy"].tolist() == [1.0, 0.0]
    assert loss[0].item() == pytest.approx(-_logsig(0.2), abs=ATOL)
    # identical policy and reference: loss = log 2
    same, _ = preference_loss(rw, rl, rw, rl)
    assert same.tolist() == pytest.approx([math.log(2)] * 2, abs=ATOL)


def test_preference_loss_argument_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError):
        preference_loss(x, x, x, x, "ipo", 0.1)  # lengths missing
    with pytest.raises(ValueError):
        preference_loss(x, x, None, None, "sigmoid", 0.1)
    with pytest.raises(ValueError, match=r"^label_smoothing is not used"):
        preference_loss(x, x, x, x, "hinge", 0.1, 0.1)
    # one way to say cDPO: label-smoothed sigmoid is kind="cdpo"
    with pytest.raises(ValueError, match=r"^label_smoothing is not used by kind='sigmoid'.*cdpo"):
        preference_loss(x, x, x, x, "sigmoid", 0.1, 0.1)
    for kind in ("cdpo", "robust"):
        with pytest.raises(ValueError, match=r"^label_smoothing must be in \[0, 0.5\)"):
            preference_loss(x, x, x, x, kind, 0.1, 0.5)
    with pytest.raises(ValueError, match=r"^kind='kto'"):
        preference_loss(x, x, x, x, "kto", 0.1)
    loss, _ = preference_loss(x - 1, x - 2, None, None, "simpo", 1.0, 0.0, 0.0, x + 1, x + 1)
    assert loss.tolist() == pytest.approx([-_logsig(1.0)] * 2, abs=ATOL)


H_GRID = (-2.0, 0.0, 0.5, 3.0)


def _loss_at(h, kind, eps):
    """preference_loss of pairs whose implicit reward margin is exactly h (beta = 1, ref = 0)."""
    h = torch.as_tensor(h, dtype=torch.float32)
    zero = torch.zeros_like(h)
    loss, met = preference_loss(h, zero, zero, zero, kind, 1.0, eps)
    torch.testing.assert_close(met["margin"], h)
    return loss


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_and_robust_match_their_formulas(eps):
    cdpo = _loss_at(H_GRID, "cdpo", eps)
    robust = _loss_at(H_GRID, "robust", eps)
    assert cdpo.tolist() == pytest.approx([_cdpo(h, eps) for h in H_GRID], abs=ATOL)
    assert robust.tolist() == pytest.approx([_robust(h, eps) for h in H_GRID], abs=ATOL)
    # h = 0: both are log 2 whatever eps ((1 - eps) log 2 - eps log 2) / (1 - 2 eps) = log 2
    assert cdpo[1].item() == pytest.approx(math.log(2), abs=ATOL)
    assert robust[1].item() == pytest.approx(math.log(2), abs=ATOL)
    # they differ from each other (and from sigmoid) away from h = 0
    sig = _loss_at(H_GRID, "sigmoid", 0.0)
    for i in (0, 2, 3):
        assert abs(robust[i].item() - cdpo[i].item()) > 1e-3
        assert abs(robust[i].item() - sig[i].item()) > 1e-3


def test_cdpo_and_robust_hand_values():
    # l(3) = log(1 + e^-3) = 0.048587, l(-3) = log(1 + e^3) = 3.048587, l(0.5) = 0.474077,
    # l(-0.5) = 0.974077, l(-2) = 2.126928, l(2) = 0.126928
    # robust, eps 0.1: (0.9 l(h) - 0.1 l(-h)) / 0.8 ; cdpo, eps 0.1: 0.9 l(h) + 0.1 l(-h)
    robust = _loss_at(H_GRID, "robust", 0.1)
    assert robust.tolist() == pytest.approx([2.376928, 0.693147, 0.411577, -0.326413], abs=ATOL)
    cdpo = _loss_at(H_GRID, "cdpo", 0.1)
    assert cdpo.tolist() == pytest.approx([1.926928, 0.693147, 0.524077, 0.348587], abs=ATOL)
    # eps 0.3: robust = (0.7 l(h) - 0.3 l(-h)) / 0.4
    robust3 = _loss_at(H_GRID, "robust", 0.3)
    assert robust3.tolist() == pytest.approx([3.626928, 0.693147, 0.099077, -2.201413], abs=ATOL)
    # cdpo, eps 0.3: 0.7 l(h) + 0.3 l(-h)
    cdpo3 = _loss_at(H_GRID, "cdpo", 0.3)
    assert cdpo3.tolist() == pytest.approx([1.526928, 0.693147, 0.624077, 0.948587], abs=ATOL)


@pytest.mark.parametrize("eps", [0.1, 0.3, 0.45])
def test_robust_is_unbiased_under_label_flips(eps):
    # a label flipped with probability eps swaps chosen and rejected (h -> -h); the expected
    # robust loss is then the clean sigmoid loss l(h) -- cDPO's is not
    h = torch.tensor([*H_GRID, -7.0, 1.3, 12.0])
    clean = -torch.nn.functional.logsigmoid(h)
    robust_pos, robust_neg = _loss_at(h, "robust", eps), _loss_at(-h, "robust", eps)
    torch.testing.assert_close((1 - eps) * robust_pos + eps * robust_neg, clean, atol=1e-5, rtol=0)
    cdpo_pos, cdpo_neg = _loss_at(h, "cdpo", eps), _loss_at(-h, "cdpo", eps)
    biased = (1 - eps) * cdpo_pos + eps * cdpo_neg - clean
    assert (biased.abs()[h != 0] > 1e-3).all()
    # the same through swapped policy log-probs (the metric margin flips sign as well)
    pw, pl, rw, rl = (
        torch.tensor([-3.0]),
        torch.tensor([-5.0]),
        torch.tensor([-4.0]),
        torch.zeros(1),
    )
    fwd, met_f = preference_loss(pw, pl, rw, rl, "robust", 0.5, eps)
    bwd, met_b = preference_loss(pl, pw, rl, rw, "robust", 0.5, eps)
    torch.testing.assert_close(met_b["margin"], -met_f["margin"])
    expect = _l(met_f["margin"].item())
    assert ((1 - eps) * fwd + eps * bwd).item() == pytest.approx(expect, abs=ATOL)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_robust_and_cdpo_gradient_signs(eps):
    h = torch.tensor([*H_GRID, 8.0, 20.0], requires_grad=True)
    zero = torch.zeros_like(h)
    loss, _ = preference_loss(h, zero, zero, zero, "robust", 1.0, eps)
    (g,) = torch.autograd.grad(loss.sum(), h)
    sig = torch.sigmoid(h.detach())
    expect = -((1 - eps) * (1 - sig) + eps * sig) / (1 - 2 * eps)
    torch.testing.assert_close(g, expect, atol=1e-6, rtol=1e-5)
    assert (g < 0).all()  # robust always pushes the margin up (never towards a finite optimum)
    # cDPO: the gradient changes sign at h* = log((1 - eps) / eps) (soft-label optimum)
    loss_c, _ = preference_loss(h, zero, zero, zero, "cdpo", 1.0, eps)
    (gc,) = torch.autograd.grad(loss_c.sum(), h)
    torch.testing.assert_close(gc, -(1 - eps) * (1 - sig) + eps * sig, atol=1e-6, rtol=1e-5)
    h_star = math.log((1 - eps) / eps)
    assert (gc[h.detach() < h_star] < 0).all() and (gc[h.detach() > h_star] > 0).all()
    at_star = torch.tensor([h_star], requires_grad=True)
    loss_s, _ = preference_loss(
        at_star, torch.zeros(1), torch.zeros(1), torch.zeros(1), "cdpo", 1.0, eps
    )
    (gs,) = torch.autograd.grad(loss_s.sum(), at_star)
    assert gs.item() == pytest.approx(0.0, abs=1e-6)


def test_cdpo_and_robust_without_smoothing_are_sigmoid():
    h = torch.tensor([*H_GRID, -9.0, 15.0])
    sig = _loss_at(h, "sigmoid", 0.0)
    assert sig.tolist() == pytest.approx([_l(float(v)) for v in h], abs=ATOL)
    assert torch.equal(_loss_at(h, "cdpo", 0.0), sig)
    assert torch.equal(_loss_at(h, "robust", 0.0), sig)


def test_rpo_nll():
    lp = torch.tensor([[-1.0, -3.0, 9.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert rpo_nll(lp, m).tolist() == pytest.approx([2.0, 2.0, 0.0])


def test_bradley_terry_loss():
    rw, rl = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.5, 1.0])
    loss, acc = bradley_terry_loss(rw, rl)
    assert loss.tolist() == pytest.approx([-_logsig(1.0), -_logsig(-0.5), math.log(2)], abs=ATOL)
    assert acc.tolist() == [1.0, 0.0, 0.0]
    loss_m, _ = bradley_terry_loss(rw, rl, torch.tensor([0.5, 0.0, 1.0]))
    assert loss_m.tolist() == pytest.approx(
        [-_logsig(0.5), -_logsig(-0.5), -_logsig(-1.0)], abs=ATOL
    )
    loss_s, _ = bradley_terry_loss(rw, rl, 0.5)
    assert loss_s[0].item() == pytest.approx(-_logsig(0.5), abs=ATOL)
