"""Pure loss math for post-training (formulas and their tests: docs/algorithms.md).

Every function here is a small pure torch function: no model, no config object, no I/O.
Shapes: B = samples in the (micro-)batch, T = tokens, V = vocabulary, N = preference pairs.

How a trainer composes the per-token policy objective (the order matters only for the weight w):

    loss_tok, stats = policy_loss(logp, logp_old, adv, mask, clip_low=..., clip_high=...)
    w, mismatch = rollout_correction(logp_old, logp_roll, mask, method, threshold=..., tis_cap=...)
    if w is not None:                     # TIS, masked IS, IcePop, ... (posttrain/off_policy.py)
        loss_tok = w * loss_tok
    if kl_coef:
        loss_tok = loss_tok + kl_coef * kl_estimate(logp, logp_ref, "k3")
    if entropy_coef:                      # entropy bonus: applied by the caller
        loss_tok = loss_tok - entropy_coef * token_entropy(logits, temperature)
    den = aggregation_denominator(all_masks_of_the_step, mode)   # global, once per step
    loss = aggregate(loss_tok, mask, mode, den, max_new_tokens)  # this micro-batch's share

Summing `loss` over every micro-batch (and rank) of the step gives the step loss, so gradients
accumulated with `loss.backward()` per micro-batch equal those of the full batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# the rollout/trainer mismatch corrections live in posttrain/off_policy.py; re-exported here
from posttrain.off_policy import tis_weights as tis_weights

AGGREGATION_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")
PREFERENCE_KINDS = (
    "sigmoid",
    "cdpo",
    "robust",
    "ipo",
    "hinge",
    "simpo",
    "length_normalized",
)

# exp() of a log-ratio is evaluated on a value clamped to this range, so that a wild token cannot
# turn the loss into inf/nan (exp(20) ~ 4.9e8 is far outside any clip range).
_MAX_LOG_RATIO = 20.0


def _check_choice(value: str, choices: tuple[str, ...], argument: str) -> None:
    """Raise ValueError naming `argument` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{argument}={value!r} is not valid; choose one of {', '.join(choices)}")


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """`x` where `mask` is true, 0 elsewhere (unlike `x * mask`, nan/inf at padding are dropped)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------- log-probs / entropy


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each target token under softmax(logits / temperature).

    Args:
        logits: [B, T, V] any float dtype; computed in float32.
        targets: [B, T] token ids. Negative ids (e.g. -100 ignore index) give 0.
        temperature: > 0; the logits are divided by it (as the sampler did).

    Returns:
        [B, T] float32 log-probs.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    safe = targets.clamp_min(0).long()
    picked = torch.gather(z, -1, safe.unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(z, dim=-1)
    return torch.where(targets >= 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy H_t = -sum_v p log p of softmax(logits / temperature), in float32.

    Args:
        logits: [B, T, V].
        temperature: > 0.

    Returns:
        [B, T] float32 entropies (differentiable; detach for logging / modulation).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------- policy loss


def policy_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip_c: float | None = None,
    ratio_level: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss per token: l_t = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A).

    With `ratio_level="sequence"` (GSPO) r is replaced, for every token of sample i, by
    s_i = exp(sum_t m (logp - logp_old) / sum_t m). With `dual_clip_c` = c (> 1), tokens with
    A < 0 get l_t = min(l_t, -c A). The log-ratio is clamped to +-20 before exp() for safety.
    The entropy bonus and KL penalty are added by the caller (see the module docstring).

    Args:
        logp: [B, T] current policy log-probs (with grad).
        logp_old: [B, T] log-probs the step's data is attributed to (no grad).
        advantages: [B, T] advantages already broadcast per token.
        mask: [B, T] bool/0-1, 1 on completion tokens that count.
        clip_low: eps_low (lower clip is 1 - clip_low).
        clip_high: eps_high (upper clip is 1 + clip_high).
        dual_clip_c: dual-clip constant c > 1, or None (off).
        ratio_level: "token" or "sequence".

    Returns:
        loss_tok: [B, T] per-token loss, 0 where mask is 0.
        stats: `ratio` [B, T] (detached ratio used), `clipped` [B, T] bool (masked tokens where the
        clipped branch was strictly larger, i.e. chosen), `dual_clipped` [B, T] bool.
    """
    _check_choice(ratio_level, RATIO_LEVELS, "ratio_level")
    m = mask.bool()
    log_ratio = _masked(logp.float() - logp_old.float(), m)
    if ratio_level == "sequence":
        n_tok = m.sum(-1, keepdim=True).clamp_min(1)
        log_ratio = (log_ratio.sum(-1, keepdim=True) / n_tok).expand_as(log_ratio)
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped_branch = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_branch)
    clipped = (clipped_branch > unclipped) & m
    dual_clipped = torch.zeros_like(m)
    if dual_clip_c is not None:
        if dual_clip_c <= 1:
            raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
        cap = -dual_clip_c * adv
        dual_clipped = (adv < 0) & (loss > cap) & m
        loss = torch.where(adv < 0, torch.minimum(loss, cap), loss)
    stats = {"ratio": ratio.detach(), "clipped": clipped, "dual_clipped": dual_clipped}
    return _masked(loss, m), stats


def kl_estimate(logp: Tensor, logp_ref: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(pi || ref) estimate.

    k1 = logp - logp_ref; k2 = (logp - logp_ref)^2 / 2;
    k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1.

    Args:
        logp: [B, T] current policy log-probs.
        logp_ref: [B, T] reference log-probs.
        estimator: "k1", "k2" or "k3".

    Returns:
        [B, T] float32 (unmasked; aggregate() applies the mask).
    """
    _check_choice(estimator, KL_ESTIMATORS, "estimator")
    d = logp.float() - logp_ref.float()
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(-d) + d - 1.0


# --------------------------------------------------------------------------- aggregation


def aggregation_denominator(mask: Tensor | list[Tensor], mode: str) -> float:
    """Global denominator of a step for `aggregate`.

    Args:
        mask: [N, T] mask of the whole step, or a list of micro-batch masks [B_k, T_k].
        mode: "token_mean" (count of mask tokens) or a `seq_*` mode (count of samples with at
            least one mask token).

    Returns:
        The denominator as a float (all-reduce-sum it across ranks before use).
    """
    _check_choice(mode, AGGREGATION_MODES, "mode")
    masks = mask if isinstance(mask, (list, tuple)) else [mask]
    total = 0.0
    for mk in masks:
        mb = mk.bool()
        total += float(mb.sum()) if mode == "token_mean" else float(mb.any(-1).sum())
    return total


def aggregate(
    loss_tok: Tensor,
    mask: Tensor,
    mode: str,
    denominator: float,
    max_new_tokens: int | None = None,
) -> Tensor:
    """This micro-batch's share of the step loss.

    token_mean: sum m l / D (D = step token count).
    seq_mean_token_mean: sum_i (sum_t m l / sum_t m) / D (D = step sample count).
    seq_mean_token_sum_norm: sum_i sum_t m l / L / D (L = max_new_tokens, D = step sample count).

    Args:
        loss_tok: [B, T] per-token loss.
        mask: [B, T] bool/0-1.
        mode: one of AGGREGATION_MODES.
        denominator: from `aggregation_denominator` over the whole step (all micro-batches/ranks).
        max_new_tokens: L, required for `seq_mean_token_sum_norm`.

    Returns:
        Scalar tensor; summing it over all micro-batches gives the step loss. 0 (with grad graph)
        if denominator <= 0.
    """
    _check_choice(mode, AGGREGATION_MODES, "mode")
    m = mask.bool()
    masked = _masked(loss_tok, m)
    if denominator <= 0:
        return masked.sum() * 0.0
    if mode == "token_mean":
        return masked.sum() / denominator
    if mode == "seq_mean_token_mean":
        per_seq = masked.sum(-1) / m.sum(-1).clamp_min(1)
        return per_seq.sum() / denominator
    if max_new_tokens is None or max_new_tokens <= 0:
        raise ValueError("seq_mean_token_sum_norm needs max_new_tokens > 0")
    return masked.sum() / float(max_new_tokens) / denominator


# --------------------------------------------------------------------------- value loss


def value_loss(
    values: Tensor,
    values_old: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO value loss per token: 1/2 max((V - G)^2, (clip(V, V_old +- eps) - G)^2).

    Aggregate with `aggregate(..., mode="token_mean", ...)`.

    Args:
        values: [B, T] critic values (with grad).
        values_old: [B, T] critic values at rollout time.
        returns: [B, T] GAE returns G.
        mask: [B, T] bool/0-1.
        clip_eps: eps_v, or None for the unclipped 1/2 (V - G)^2.

    Returns:
        loss_tok: [B, T] float32, 0 where mask is 0.
        stats: `clipped` [B, T] bool (masked tokens where the clipped term was strictly larger).
    """
    v = values.float()
    g = returns.float()
    un = (v - g) ** 2
    if clip_eps is None:
        return _masked(0.5 * un, mask), {"clipped": torch.zeros_like(mask.bool())}
    vo = values_old.float()
    v_clip = torch.clamp(v, vo - clip_eps, vo + clip_eps)
    cl = (v_clip - g) ** 2
    loss = 0.5 * torch.maximum(un, cl)
    return _masked(loss, mask), {"clipped": (cl > un) & mask.bool()}


# --------------------------------------------------------------------------- preference losses


def _smoothed_sigmoid_loss(h: Tensor, label_smoothing: float) -> Tensor:
    """cDPO: -(1 - eps) log sig(h) - eps log sig(-h), the sigmoid loss against soft labels."""
    loss = -F.logsigmoid(h)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-h)
    return loss


def _robust_sigmoid_loss(h: Tensor, flip_rate: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024): ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps).

    l(h) = -log sig(h). With labels flipped at rate eps, the expectation over flips
    (1 - eps) loss(h) + eps loss(-h) equals the clean l(h) (unbiased); the loss itself is not
    bounded below (about -eps h / (1 - 2 eps) for large h).
    """
    loss = -F.logsigmoid(h)
    if flip_rate:
        loss = ((1.0 - flip_rate) * loss + flip_rate * F.logsigmoid(-h)) / (1.0 - 2.0 * flip_rate)
    return loss


def preference_loss(
    pi_w: Tensor,
    pi_l: Tensor,
    ref_w: Tensor | None = None,
    ref_l: Tensor | None = None,
    kind: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    len_w: Tensor | None = None,
    len_l: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO-family loss per pair, h = beta [(pi_w - ref_w) - (pi_l - ref_l)].

    With l(h) = -log sig(h) and eps = label_smoothing:
    sigmoid: l(h) (eps must be 0: label-smoothed sigmoid DPO is `cdpo`).
    cdpo: (1 - eps) l(h) + eps l(-h) = -(1 - eps) log sig(h) - eps log sig(-h) (conservative
    DPO, soft labels).
    robust: ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps) (Chowdhury et al. 2024, unbiased under a
    label-flip rate eps; not bounded below).
    ipo: (h / beta - 1 / (2 beta))^2 with log-probs averaged over tokens (eps must be 0).
    hinge: max(0, 1 - h) (eps must be 0).
    simpo: cdpo loss of h = beta pi_w/|y_w| - beta pi_l/|y_l| - gamma (no reference).
    length_normalized: cdpo loss of h with pi and ref averaged over tokens.
    eps = 0 turns cdpo, robust, simpo and length_normalized into their plain sigmoid loss.

    Args:
        pi_w, pi_l: [N] policy sequence log-probs (sum over response tokens) of chosen/rejected.
        ref_w, ref_l: [N] reference sequence log-probs (unused by simpo).
        kind: one of PREFERENCE_KINDS.
        beta: temperature beta.
        label_smoothing: eps in [0, 0.5): the soft-label weight (cdpo, simpo, length_normalized)
            or the assumed label-flip rate (robust).
        gamma: SimPO target margin.
        len_w, len_l: [N] response token counts (required for ipo, simpo, length_normalized).

    Returns:
        loss: [N] per-pair loss (mean it over all pairs of the step).
        metrics: detached [N] tensors `rewards_chosen`, `rewards_rejected` (beta * (pi - ref) of the
        log-probs the loss used; beta * pi / |y| for simpo), `margin` (chosen - rejected),
        `accuracy` (1.0 where chosen reward > rejected reward).
    """
    _check_choice(kind, PREFERENCE_KINDS, "kind")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and kind in ("sigmoid", "ipo", "hinge"):
        hint = " (label-smoothed sigmoid DPO is kind='cdpo')" if kind == "sigmoid" else ""
        raise ValueError(f"label_smoothing is not used by kind={kind!r}; pass 0{hint}")
    pw, pl = pi_w.float(), pi_l.float()
    if kind in ("ipo", "simpo", "length_normalized"):
        if len_w is None or len_l is None:
            raise ValueError(f"preference_loss kind={kind} needs len_w and len_l")
        nw, nl = len_w.float().clamp_min(1), len_l.float().clamp_min(1)
    if kind == "simpo":
        rw, rl = beta * pw / nw, beta * pl / nl
        loss = _smoothed_sigmoid_loss(rw - rl - gamma, label_smoothing)
    else:
        if ref_w is None or ref_l is None:
            raise ValueError(f"preference_loss kind={kind} needs ref_w and ref_l")
        fw, fl = ref_w.float(), ref_l.float()
        if kind in ("ipo", "length_normalized"):
            pw, pl, fw, fl = pw / nw, pl / nl, fw / nw, fl / nl
        rw, rl = beta * (pw - fw), beta * (pl - fl)
        h = rw - rl
        if kind == "ipo":
            loss = (h / beta - 1.0 / (2.0 * beta)) ** 2
        elif kind == "hinge":
            loss = torch.relu(1.0 - h)
        elif kind == "robust":
            loss = _robust_sigmoid_loss(h, label_smoothing)
        else:  # sigmoid (eps = 0), cdpo, length_normalized
            loss = _smoothed_sigmoid_loss(h, label_smoothing)
    metrics = {
        "rewards_chosen": rw.detach(),
        "rewards_rejected": rl.detach(),
        "margin": (rw - rl).detach(),
        "accuracy": (rw > rl).float(),
    }
    return loss, metrics


def rpo_nll(logp_w_tok: Tensor, mask_w: Tensor) -> Tensor:
    """RPO term: token-mean NLL of each chosen response (add alpha * this to the DPO loss).

    Args:
        logp_w_tok: [N, T] per-token policy log-probs of the chosen responses.
        mask_w: [N, T] bool/0-1 response-token mask.

    Returns:
        [N] float32: -sum_t m logp / sum_t m (0 for an empty response).
    """
    m = mask_w.bool()
    return -_masked(logp_w_tok.float(), m).sum(-1) / m.sum(-1).clamp_min(1)


def bradley_terry_loss(
    r_w: Tensor, r_l: Tensor, margin: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """Reward-model loss -log sigmoid(r_w - r_l - margin).

    Args:
        r_w: [N] scalar-head rewards of the chosen responses.
        r_l: [N] rewards of the rejected responses.
        margin: [N] or scalar margin, or None (0).

    Returns:
        loss: [N] per-pair loss.
        accuracy: [N] float, 1.0 where r_w > r_l.
    """
    d = r_w.float() - r_l.float()
    if margin is not None:
        d = d - (margin.float() if isinstance(margin, Tensor) else float(margin))
    return -F.logsigmoid(d), (r_w > r_l).float()


# --------------------------------------------------------------------------- REBEL


def rebel_pairs(num_groups: int, group_size: int, valid: Tensor | None = None) -> Tensor:
    """All index pairs (i, j), i < j, of samples of the same group (flat prompt-major indexing).

    Args:
        num_groups: P.
        group_size: G.
        valid: optional [P, G] bool; pairs touching an invalid sample are dropped.

    Returns:
        [M, 2] long tensor of flat indices into a [P * G] batch.
    """
    iu = torch.triu_indices(group_size, group_size, offset=1)  # [2, G(G-1)/2]
    base = (torch.arange(num_groups) * group_size).unsqueeze(1)  # [P, 1]
    pairs = torch.stack([base + iu[0], base + iu[1]], dim=-1).reshape(-1, 2)
    if valid is not None:
        flat = valid.reshape(-1).bool().cpu()
        pairs = pairs[flat[pairs[:, 0]] & flat[pairs[:, 1]]]
    return pairs


def rebel_loss(
    seq_logp: Tensor, seq_logp_old: Tensor, rewards: Tensor, eta: float, pairs: Tensor
) -> Tensor:
    """REBEL regression loss per pair.

    loss = ((1/eta) [(logp_i - logp_old_i) - (logp_j - logp_old_j)] - (R_i - R_j))^2.

    Args:
        seq_logp: [N] sequence log-probs under the current policy (sum over tokens).
        seq_logp_old: [N] sequence log-probs under the old policy.
        rewards: [N] scalar rewards.
        eta: REBEL step size (> 0).
        pairs: [M, 2] long indices (i, j) into the N samples, e.g. from `rebel_pairs`.

    Returns:
        [M] per-pair loss.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    pairs = pairs.to(seq_logp.device)
    lr = seq_logp.float() - seq_logp_old.float()
    r = rewards.float().to(seq_logp.device)
    i, j = pairs[:, 0], pairs[:, 1]
    return ((lr[i] - lr[j]) / eta - (r[i] - r[j])) ** 2


# --------------------------------------------------------------------------- adaptive KL


def adaptive_kl_update(beta: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """One adaptive-KL step: beta (1 + clip((KL - target) / target, -0.2, 0.2) * n / horizon).

    Args:
        beta: current KL coefficient.
        kl: observed KL of the step.
        target: target KL (> 0).
        n_steps: n, samples (or steps) seen since the last update.
        horizon: controller horizon (> 0).

    Returns:
        The new beta.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError("adaptive KL needs target > 0 and horizon > 0")
    err = min(max((kl - target) / target, -0.2), 0.2)
    return beta * (1.0 + err * n_steps / horizon)


class AdaptiveKLController:
    """Stateful wrapper around `adaptive_kl_update` (Ziegler et al. 2019)."""

    def __init__(self, init_beta: float, target: float, horizon: int) -> None:
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, kl: float, n_steps: int) -> float:
        """Update and return beta given the step's observed KL and its sample count."""
        self.beta = adaptive_kl_update(self.beta, kl, self.target, n_steps, self.horizon)
        return self.beta
