"""Rollout/trainer mismatch: the engine's and the trainer's log-probs of the sampled tokens.

Pure torch functions (no model, no config object, no I/O); formulas and their tests are in
docs/algorithms.md §4 ("Rollout corrections"). Every input is [B, T] (B samples, T tokens); every
weight and mask returned is detached float32 with 0 on padded tokens (mask 0), and is multiplied
into the per-token clipped surrogate, as TIS is:

    w, stats = rollout_correction(logp_old, logp_roll, mask, method, threshold=..., tis_cap=...)
    if w is not None:
        loss_tok = w * loss_tok

With d = logp_old - logp_roll (the trainer's log-prob minus the engine's) and r = exp(d):

    tis           w = min(r, tis_cap)
    token_mis     w = r where r <= C, else 0                        (C = threshold)
    seq_mis       w = R_i = exp(sum_t d) on every token of sample i where R_i <= C, else 0
    icepop        w = 1 where 1/k <= r <= k, else 0                 (k = threshold)
    geo_mask      w = 1 on every token of sample i where 1/k <= g_i <= k, else 0,
                  g_i = exp(mean_t d)
    icepop_tis, geo_mask_tis: the mask times min(r, tis_cap)
    none          no weight (metrics only)

Stats are sums (or a max, `mismatch_abs_max`) over this micro-batch's loss tokens, so a caller
adds them over micro-batches and ranks and divides once (or takes the max).
"""

from __future__ import annotations

import torch
from torch import Tensor

ROLLOUT_CORRECTIONS = (
    "tis",
    "none",
    "token_mis",
    "seq_mis",
    "icepop",
    "icepop_tis",
    "geo_mask",
    "geo_mask_tis",
)
# the corrections that multiply their mask by the TIS weight min(r, tis_cap)
WITH_TIS = ("tis", "icepop_tis", "geo_mask_tis")

# The k3 metric evaluates exp(d) on d clamped to at most this, so that a wild token keeps the
# logged value finite (as losses._MAX_LOG_RATIO does for the surrogate's ratio).
_MAX_LOG_RATIO = 20.0


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """`x` where `mask` is true, 0 elsewhere (unlike `x * mask`, nan/inf at padding are dropped)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def log_ratio(logp_old: Tensor, logp_roll: Tensor, mask: Tensor) -> Tensor:
    """d = logp_old - logp_roll on loss tokens, 0 elsewhere.

    Args:
        logp_old: [B, T] trainer log-probs at the start of the step.
        logp_roll: [B, T] log-probs reported by the rollout engine.
        mask: [B, T] bool/0-1 loss tokens.

    Returns:
        [B, T] detached float32.
    """
    return _masked((logp_old.float() - logp_roll.float()).detach(), mask)


def tis_weights(
    logp_old: Tensor, logp_roll: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated IS weights for rollout/trainer mismatch: w = min(exp(logp_old - logp_roll), cap).

    Args:
        logp_old: [B, T] trainer log-probs at the start of the step.
        logp_roll: [B, T] log-probs reported by the rollout engine.
        mask: [B, T] bool/0-1.
        cap: the truncation cap (>= 1).

    Returns:
        w: [B, T] detached float32 weights, 0 where mask is 0 (multiply into loss_tok).
        stats: scalar float tensors `mismatch_abs_sum` (sum of |logp_old - logp_roll| over masked
        tokens), `capped_count` (masked tokens with exp(.) > cap), `token_count`; sums, so they can
        be added over micro-batches/ranks and divided at the end.
    """
    m = mask.bool()
    diff = log_ratio(logp_old, logp_roll, m)
    raw = torch.exp(diff)
    w = _masked(torch.clamp(raw, max=cap), m)
    stats = {
        "mismatch_abs_sum": diff.abs().sum(),
        "capped_count": ((raw > cap) & m).sum().float(),
        "token_count": m.sum().float(),
    }
    return w, stats


def token_mis_weights(
    logp_old: Tensor, logp_roll: Tensor, mask: Tensor, threshold: float
) -> tuple[Tensor, Tensor]:
    """Token-level masked IS: w_t = r_t where r_t = exp(d_t) <= threshold, else 0 (dropped).

    Args:
        logp_old, logp_roll: [B, T] trainer and engine log-probs.
        mask: [B, T] bool/0-1 loss tokens.
        threshold: C > 1; tokens whose ratio exceeds it are left out of the loss.

    Returns:
        w: [B, T] detached float32 weights (the untruncated ratio where kept).
        keep: [B, T] float32, 1 on kept loss tokens, 0 on dropped ones and padding.
    """
    m = mask.bool()
    raw = torch.exp(log_ratio(logp_old, logp_roll, m))
    keep = m & (raw <= threshold)
    return _masked(raw, keep), keep.float()


def seq_mis_weights(
    logp_old: Tensor, logp_roll: Tensor, mask: Tensor, threshold: float
) -> tuple[Tensor, Tensor]:
    """Sequence-level masked IS: R_i = exp(sum_t d_{i,t}) on every token of sample i, or 0 for
    the whole sample when R_i > threshold.

    Args:
        logp_old, logp_roll: [B, T] trainer and engine log-probs.
        mask: [B, T] bool/0-1 loss tokens (the sum runs over them only).
        threshold: C > 1.

    Returns:
        w: [B, T] detached float32 weights (R_i broadcast over sample i's loss tokens).
        keep: [B, T] float32, 1 on the loss tokens of kept samples.
    """
    m = mask.bool()
    seq_ratio = torch.exp(log_ratio(logp_old, logp_roll, m).sum(-1, keepdim=True))  # [B, 1]
    keep = m & (seq_ratio <= threshold)
    return _masked(seq_ratio.expand_as(m), keep), keep.float()


def icepop_mask(logp_old: Tensor, logp_roll: Tensor, mask: Tensor, k: float) -> Tensor:
    """IcePop token mask: 1 where 1/k <= exp(d_t) <= k, 0 outside the band (and on padding).

    Args:
        logp_old, logp_roll: [B, T] trainer and engine log-probs.
        mask: [B, T] bool/0-1 loss tokens.
        k: > 1, the band's upper end (its lower end is 1/k).

    Returns:
        [B, T] detached float32 0/1.
    """
    m = mask.bool()
    raw = torch.exp(log_ratio(logp_old, logp_roll, m))
    return (m & (raw >= 1.0 / k) & (raw <= k)).float()


def geo_mask(logp_old: Tensor, logp_roll: Tensor, mask: Tensor, k: float) -> Tensor:
    """Geometric-mean sequence rejection: sample i is kept (1 on its loss tokens) when
    g_i = exp(mean over its loss tokens of d) is in [1/k, k], and dropped (0) otherwise.

    Args:
        logp_old, logp_roll: [B, T] trainer and engine log-probs.
        mask: [B, T] bool/0-1 loss tokens.
        k: > 1.

    Returns:
        [B, T] detached float32 0/1.
    """
    m = mask.bool()
    n = m.sum(-1, keepdim=True).clamp_min(1)
    g = torch.exp(log_ratio(logp_old, logp_roll, m).sum(-1, keepdim=True) / n)  # [B, 1]
    return (m & (g >= 1.0 / k) & (g <= k)).float()


def mismatch_stats(logp_old: Tensor, logp_roll: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the engine's log-probs are from the trainer's, over the loss tokens.

    With d = logp_old - logp_roll and r = exp(d) = pi_train / pi_roll, the per-token k3 estimate
    of KL(pi_roll || pi_train) for tokens sampled from pi_roll is (r - 1) - log r = exp(d) - 1 - d
    (>= 0; computed in float64 as expm1(d) - d, with d clamped to at most 20).

    Args:
        logp_old, logp_roll: [B, T] trainer and engine log-probs.
        mask: [B, T] bool/0-1 loss tokens.

    Returns:
        Scalar tensors: `mismatch_abs_sum` (sum of |d|), `mismatch_abs_max` (max of |d|, 0 with
        no loss token), `mismatch_k3_sum` (sum of the k3 terms, float64), `token_count`.
    """
    m = mask.bool()
    d = log_ratio(logp_old, logp_roll, m)
    d64 = d.double().clamp(max=_MAX_LOG_RATIO)
    k3 = _masked(torch.expm1(d64) - d64, m)
    return {
        "mismatch_abs_sum": d.abs().sum(),
        "mismatch_abs_max": d.abs().max() if d.numel() else d.new_zeros(()),
        "mismatch_k3_sum": k3.sum(),
        "token_count": m.sum().float(),
    }


def rollout_correction(
    logp_old: Tensor,
    logp_roll: Tensor,
    mask: Tensor,
    method: str,
    *,
    threshold: float,
    tis_cap: float | None,
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The weights of `method` (module docstring) and the step's mismatch statistics.

    Args:
        logp_old, logp_roll: [B, T] trainer and engine log-probs.
        mask: [B, T] bool/0-1 loss tokens.
        method: one of `ROLLOUT_CORRECTIONS`.
        threshold: C of `token_mis`/`seq_mis`, k of `icepop*`/`geo_mask*` (> 1).
        tis_cap: the cap of the TIS factor of `tis`, `icepop_tis`, `geo_mask_tis`; None leaves
            that factor out (`tis` then gives no weight, as `loss.tis_cap: null` always did).

    Returns:
        w: [B, T] detached float32 weights, 0 on padding; None when nothing reweights the loss.
        stats: `mismatch_stats` plus the sums `capped_count` (tokens the TIS factor truncated),
        `masked_token_count` (loss tokens a mask dropped), `masked_seq_count` (samples with at
        least one dropped token) and `seq_count` (samples with at least one loss token).
    """
    if method not in ROLLOUT_CORRECTIONS:
        raise ValueError(
            f"method={method!r} is not valid; choose one of {', '.join(ROLLOUT_CORRECTIONS)}"
        )
    m = mask.bool()
    stats = mismatch_stats(logp_old, logp_roll, m)
    stats["capped_count"] = torch.zeros((), device=m.device)
    w = keep = None
    if method in WITH_TIS and tis_cap is not None:
        w, tis = tis_weights(logp_old, logp_roll, m, tis_cap)
        stats["capped_count"] = tis["capped_count"]
    if method == "token_mis":
        w, keep = token_mis_weights(logp_old, logp_roll, m, threshold)
    elif method == "seq_mis":
        w, keep = seq_mis_weights(logp_old, logp_roll, m, threshold)
    elif method in ("icepop", "icepop_tis", "geo_mask", "geo_mask_tis"):
        masker = icepop_mask if method.startswith("icepop") else geo_mask
        keep = masker(logp_old, logp_roll, m, threshold)
        w = keep if w is None else w * keep
    dropped = m & (keep == 0) if keep is not None else torch.zeros_like(m)
    stats["masked_token_count"] = dropped.sum().float()
    stats["masked_seq_count"] = dropped.any(-1).sum().float()
    stats["seq_count"] = m.any(-1).sum().float()
    return w, stats
