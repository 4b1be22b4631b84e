"""Every DPO loss kind (`dpo.loss` in PREFERENCE_KINDS) runs the DPO recipe through the Trainer.

At step 1 the policy is the reference (no SFT warm-up, the reference is the start model), so the
reference-based kinds have margin h = 0 and their step-1 loss is the formula at h = 0; SimPO has
no reference, and its step-1 loss is recomputed from the start model's log-probs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from posttrain.algorithms.dpo import sequence_logps
from posttrain.config import CHOICES, load_config
from posttrain.data.preference import pair_batch
from posttrain.errors import ConfigError
from posttrain.losses import PREFERENCE_KINDS
from posttrain.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "dpo_tiny.yaml"
BETA, EPS = 0.1, 0.1
SMOOTHED = ("cdpo", "robust")  # run with dpo.label_smoothing = EPS

# the step-1 loss at h = 0 (policy == reference): l(0) = log 2 for the sigmoid-type kinds
# (robust: ((1 - eps) log 2 - eps log 2) / (1 - 2 eps) = log 2), IPO (0 - 1 / (2 beta))^2,
# hinge max(0, 1 - 0)
AT_ZERO_MARGIN = {
    "sigmoid": math.log(2),
    "cdpo": (1 - EPS) * math.log(2) + EPS * math.log(2),
    "robust": ((1 - EPS) * math.log(2) - EPS * math.log(2)) / (1 - 2 * EPS),
    "length_normalized": math.log(2),
    "ipo": (1 / (2 * BETA)) ** 2,
    "hinge": 1.0,
}


def _overrides(kind: str, model_dir: Path, out: Path) -> list[str]:
    return [
        f"model.path={model_dir}",
        f"train.output_dir={out}",
        "warmup.steps=0",  # start from the tiny model itself: policy == reference at step 1
        "train.steps=2",
        "train.save_every=0",
        "data.train_size=8",  # x 3 negatives = 24 pairs, all of them in every step
        "data.eval_size=4",
        "eval.num_problems=4",
        "dpo.pairs_per_step=24",
        "optim.warmup_steps=0",
        f"dpo.loss={kind}",
        f"dpo.beta={BETA}",
        f"dpo.label_smoothing={EPS if kind in SMOOTHED else 0.0}",
        "dpo.nll_coef=0",
        "log.wandb=disabled",
        "log.progress=false",
    ]


def _l(h: torch.Tensor) -> torch.Tensor:
    """The sigmoid DPO loss l(h) = -log sigmoid(h)."""
    return -F.logsigmoid(h)


def _expected_loss(kind: str, d, pw, pl, rw, rl, nw, nl) -> float:
    """Mean pair loss of `kind` from sequence log-probs, written out from the formulas."""
    if kind == "simpo":
        h = d.beta * pw / nw - d.beta * pl / nl - d.simpo_gamma
        return float(_l(h).mean())
    if kind in ("ipo", "length_normalized"):
        pw, pl, rw, rl = pw / nw, pl / nl, rw / nw, rl / nl
    h = d.beta * ((pw - rw) - (pl - rl))
    eps = d.label_smoothing
    per_pair = {
        "sigmoid": lambda: _l(h),
        "cdpo": lambda: (1 - eps) * _l(h) + eps * _l(-h),
        "robust": lambda: ((1 - eps) * _l(h) - eps * _l(-h)) / (1 - 2 * eps),
        "length_normalized": lambda: _l(h),
        "ipo": lambda: (h / d.beta - 1 / (2 * d.beta)) ** 2,
        "hinge": lambda: torch.relu(1 - h),
    }[kind]()
    return float(per_pair.mean())


def _seq_logps(model, pairs, pad_id: int) -> tuple[torch.Tensor, ...]:
    """(chosen, rejected) sequence log-probs and (chosen, rejected) response lengths."""
    mb = pair_batch(pairs, pad_id)
    with torch.no_grad():
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    _, seq = sequence_logps(logits.float(), mb["input_ids"], mb["mask"])
    n = mb["mask"].sum(-1)
    m = seq.shape[0] // 2
    return seq[:m], seq[m:], n[:m], n[m:]


def test_kinds_are_config_choices():
    assert CHOICES["dpo.loss"] == PREFERENCE_KINDS
    assert {"sigmoid", "cdpo", "robust", "ipo", "hinge", "simpo"} <= set(PREFERENCE_KINDS)


@pytest.mark.parametrize(
    ("kind", "eps", "error"),
    [
        ("sigmoid", 0.1, r"dpo\.loss=cdpo"),  # one way to say cDPO
        ("ipo", 0.1, r"not used by dpo\.loss=ipo"),
        ("hinge", 0.2, r"not used by dpo\.loss=hinge"),
        ("robust", 0.5, r"must be in \[0, 0\.5\)"),
        ("cdpo", -0.1, r"must be in \[0, 0\.5\)"),
        ("sigmoid", 0.0, None),
        ("cdpo", 0.0, None),
        ("cdpo", 0.2, None),
        ("robust", 0.4, None),
        ("simpo", 0.1, None),
        ("length_normalized", 0.1, None),
    ],
)
def test_label_smoothing_config_checks(tmp_path, kind, eps, error):
    args = [f"train.output_dir={tmp_path}", f"dpo.loss={kind}", f"dpo.label_smoothing={eps}"]
    if error is None:
        assert load_config(RECIPE, args).dpo.label_smoothing == eps
    else:
        with pytest.raises(ConfigError, match=error):
            load_config(RECIPE, args)


@pytest.mark.slow
@pytest.mark.parametrize("kind", PREFERENCE_KINDS)
def test_every_dpo_kind_trains_through_the_trainer(kind, tmp_path, tiny_model_dir):
    cfg = load_config(RECIPE, _overrides(kind, tiny_model_dir, tmp_path))
    assert cfg.dpo.loss == kind
    t = Trainer(cfg)
    history = t.train()
    assert len(history) == 2
    assert len(t.algorithm.train) == cfg.dpo.pairs_per_step  # step 1 sees every pair once
    assert all(math.isfinite(h["loss"]) for h in history)
    first = history[0]
    d, pad = t.cfg.dpo, t.tokenizer.pad_token_id
    if kind == "simpo":
        assert t.algorithm.ref is None
        from transformers import AutoModelForCausalLM

        start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
        pw, pl, nw, nl = _seq_logps(start.eval(), t.algorithm.train, pad)
        expected = _expected_loss(kind, d, pw, pl, None, None, nw, nl)
    else:
        assert first["margin"] == pytest.approx(0.0, abs=1e-4)
        assert t.eval_before["eval/margin"] == pytest.approx(0.0, abs=1e-4)
        expected = AT_ZERO_MARGIN[kind]
        assert t.eval_before["eval/loss"] == pytest.approx(expected, rel=1e-4)
    assert first["loss"] == pytest.approx(expected, rel=1e-4)
    # the first update moved the policy off the reference
    assert history[1]["margin"] != pytest.approx(first["margin"], abs=1e-7)
    assert history[1]["loss"] != pytest.approx(first["loss"], abs=1e-7)
    # after training (h != 0, where the kinds differ): the held-out loss from the formulas
    model = t.engine.module.eval()
    pw, pl, nw, nl = _seq_logps(model, t.algorithm.held, pad)
    ref = t.algorithm.ref.held_logps() if t.algorithm.ref is not None else torch.zeros(len(pw), 2)
    after = _expected_loss(kind, d, pw, pl, ref[:, 0], ref[:, 1], nw, nl)
    assert t.eval_after["eval/loss"] == pytest.approx(after, rel=1e-5, abs=1e-6)
    assert abs(t.eval_after["eval/margin"]) > 1e-3
