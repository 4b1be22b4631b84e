"""Pure advantage math (formulas and their tests: docs/algorithms.md).

Shapes: P = prompts (groups), G = samples per group, B = samples, T = tokens.
Sequence-level statistics are computed in float64 and returned in the rewards' float dtype
(float32 for integer/bool rewards). Invalid samples get 0 and are excluded from every statistic.
"""

from __future__ import annotations

import torch
from torch import Tensor

SEQUENCE_ESTIMATORS = ("grpo", "dr_grpo", "batch_std", "rloo", "reinforce_pp", "opo")
# every `advantage.estimator`: the sequence-level ones, and per-token GAE (PPO, `gae()`)
ESTIMATORS = (*SEQUENCE_ESTIMATORS, "gae")


def _out_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float32


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _sample_std(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sample std (n - 1) of `x` over `mask` (0 where fewer than 2 entries)."""
    m = mask.bool()
    if dim is None:
        x, m, dim = x.reshape(-1), m.reshape(-1), 0
    n = m.sum(dim, keepdim=True)
    mean = _masked(x, m).sum(dim, keepdim=True) / n.clamp_min(1)
    sq = _masked((x - mean) ** 2, m).sum(dim, keepdim=True)
    var = torch.where(n >= 2, sq / (n - 1).clamp_min(1), torch.zeros_like(sq))
    return var.sqrt()


def _flat_groups(r: Tensor, v: Tensor) -> Tensor:
    """[P, 1] bool: group has < 2 valid samples or all its valid rewards are equal."""
    inf = torch.tensor(float("inf"), dtype=r.dtype, device=r.device)
    hi = torch.where(v, r, -inf).amax(1, keepdim=True)
    lo = torch.where(v, r, inf).amin(1, keepdim=True)
    return (v.sum(1, keepdim=True) < 2) | (hi == lo)


def sequence_advantages(
    rewards: Tensor,
    valid: Tensor,
    estimator: str,
    eps: float = 1e-6,
    lengths: Tensor | None = None,
) -> Tensor:
    """Per-sample advantages from scalar rewards of P groups of G samples.

    grpo: (R - mean_g) / (std_g + eps), std_g the sample std (n - 1).
    dr_grpo: R - mean_g.
    batch_std: (R - mean_g) / (std_step + eps), std_step the sample std of all valid rewards.
    rloo: R - mean of the other valid samples of the group.
    reinforce_pp: (R - mean_step) / (std_step + eps).
    opo: R - sum |y| R / sum |y| (length-weighted group baseline; needs `lengths`).
    For every estimator except reinforce_pp, a group with < 2 valid samples or all-equal valid
    rewards gives exactly 0.

    Args:
        rewards: [P, G] scalar rewards (values at invalid samples are ignored).
        valid: [P, G] bool; False samples get 0 and are excluded from all statistics.
        estimator: one of SEQUENCE_ESTIMATORS.
        eps: added to the std.
        lengths: [P, G] completion token counts (opo only).

    Returns:
        [P, G] advantages (broadcast to tokens with `broadcast_to_tokens`).
    """
    if estimator not in SEQUENCE_ESTIMATORS:
        raise ValueError(
            f"estimator={estimator!r} is not valid; choose one of "
            f"{', '.join(SEQUENCE_ESTIMATORS)} (gae is computed per token by gae())"
        )
    if rewards.dim() != 2 or valid.shape != rewards.shape:
        raise ValueError(f"rewards/valid must both be [P, G], got {rewards.shape}, {valid.shape}")
    v = valid.bool()
    r = _masked(rewards.to(torch.float64), v)
    n = v.sum(1, keepdim=True)
    centered = _masked(r - r.sum(1, keepdim=True) / n.clamp_min(1), v)
    if estimator == "grpo":
        adv = centered / (_sample_std(r, v, dim=1) + eps)
    elif estimator == "dr_grpo":
        adv = centered
    elif estimator == "batch_std":
        adv = centered / (_sample_std(r, v) + eps)
    elif estimator == "rloo":
        others = (r.sum(1, keepdim=True) - r) / (n - 1).clamp_min(1)
        adv = r - others
    elif estimator == "reinforce_pp":
        step_mean = r.sum() / v.sum().clamp_min(1)
        adv = (r - step_mean) / (_sample_std(r, v) + eps)
    else:
        if lengths is None:
            raise ValueError("advantage.estimator=opo needs lengths [P, G]")
        w = _masked(lengths.to(torch.float64), v)
        w_sum = w.sum(1, keepdim=True)
        baseline = torch.where(w_sum > 0, (w * r).sum(1, keepdim=True) / w_sum.clamp_min(1e-12), 0)
        adv = r - baseline
    if estimator != "reinforce_pp":
        adv = torch.where(_flat_groups(r, v), torch.zeros_like(adv), adv)
    return _masked(adv, v).to(_out_dtype(rewards))


def broadcast_to_tokens(seq_adv: Tensor, mask: Tensor) -> Tensor:
    """Broadcast per-sample advantages to every masked token.

    Args:
        seq_adv: [B] per-sample advantages.
        mask: [B, T] bool/0-1.

    Returns:
        [B, T] with seq_adv[i] at masked tokens of sample i and 0 elsewhere.
    """
    return _masked(seq_adv.unsqueeze(-1).expand(mask.shape), mask)


def filter_zero_variance_groups(rewards: Tensor, valid: Tensor | None = None) -> Tensor:
    """Keep mask for DAPO dynamic sampling: drop groups whose valid rewards are all equal.

    Args:
        rewards: [P, G].
        valid: [P, G] bool or None (all valid).

    Returns:
        [P] bool, True for informative groups (>= 2 valid samples with differing rewards).
    """
    v = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    return ~_flat_groups(rewards.to(torch.float64), v).squeeze(1)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int) -> Tensor:
    """DAPO soft overlong punishment, added to R.

    0 if |y| <= L_max - L_buf; ((L_max - L_buf) - |y|) / L_buf if L_max - L_buf < |y| <= L_max;
    -1 beyond L_max.

    Args:
        lengths: [N] completion token counts |y|.
        max_len: L_max.
        buffer: L_buf, 0 <= L_buf <= L_max.

    Returns:
        [N] float32 penalties in [-1, 0].
    """
    if not 0 <= buffer <= max_len:
        raise ValueError(f"buffer must be in [0, max_len={max_len}], got {buffer}")
    y = lengths.to(torch.float32)
    start = float(max_len - buffer)
    soft = (start - y) / max(buffer, 1)
    pen = torch.where(y <= max_len, soft, torch.full_like(y, -1.0))
    return torch.where(y <= start, torch.zeros_like(y), pen)


def kl_shaped_rewards(rewards: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """PPO token rewards: r_t = -beta kl_t on masked tokens, plus R on the last masked token.

    The mask may have gaps (an episode's observation tokens): those get no KL and no reward, and
    R goes on the row's last masked (sampled) token.

    Args:
        rewards: [B] scalar rewards R.
        kl: [B, T] per-token KL estimates (detached).
        mask: [B, T] bool/0-1 (right padded; episodes: 0 on observation tokens).
        beta: KL coefficient.

    Returns:
        [B, T] float32 token rewards (0 where mask is 0; R dropped for rows without tokens).
    """
    m = mask.bool()
    out = _masked(-beta * kl.detach().float(), m)
    pos = torch.arange(m.shape[-1], device=m.device).expand(m.shape)
    last = torch.where(m, pos, -1).amax(-1)  # [B]
    has = last >= 0
    add = torch.zeros_like(out)
    add[has, last[has]] = rewards.to(out)[has]
    return out + add


def _gae_runs(r: Tensor, v: Tensor, m: Tensor, gamma: float, lam: float) -> Tensor:
    """The GAE recursion along rows whose mask is one contiguous run (r, v already masked).

    Args:
        r: [B, T] float token rewards, 0 where m is 0.
        v: [B, T] float values, 0 where m is 0.
        m: [B, T] float 0/1 mask.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        [B, T] advantages, 0 where m is 0.
    """
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
    return adv


@torch.no_grad()
def gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the masked tokens of each row.

    With t_1 < ... < t_n the masked positions of a row (a completion's tokens, or an episode's
    sampled tokens with the observation tokens between its turns skipped):
    delta_k = r_{t_k} + gamma V_{t_{k+1}} - V_{t_k} with V_{t_{n+1}} = 0;
    A_{t_k} = sum_j (gamma lam)^j delta_{k+j}; G_t = A_t + V_t. Not whitened (see `whiten`).
    Each row's masked tokens are moved to the front (in order), the recursion runs along them
    and the result is scattered back: unmasked positions get no value, reward or advantage.
    For a contiguous mask this is exactly the plain recursion along the run.

    Args:
        token_rewards: [B, T] (e.g. from `kl_shaped_rewards`).
        values: [B, T] critic values at rollout time.
        mask: [B, T] bool/0-1; 1 on the completion's (episodes: the sampled) tokens.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        advantages: [B, T] float32, 0 where mask is 0.
        returns: [B, T] float32, 0 where mask is 0.
    """
    m = mask.bool()
    n = m.sum(-1)  # [B]
    width = int(n.max()) if n.numel() else 0
    # stable sort of the keys 0 (masked) / 1 (not): each row's masked positions first, in order
    order = torch.argsort((~m).to(torch.uint8), dim=-1, stable=True)[:, :width]  # [B, W]
    packed = torch.arange(width, device=m.device).expand(m.shape[0], width) < n.unsqueeze(-1)
    r = _masked(token_rewards.float().gather(-1, order), packed)
    v = _masked(values.float().gather(-1, order), packed)
    adv_packed = _gae_runs(r, v, packed.float(), gamma, lam)
    adv = torch.zeros(m.shape, dtype=r.dtype, device=r.device).scatter(-1, order, adv_packed)
    return adv, _masked(adv + _masked(values.float(), m), m)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise `x` to zero mean and unit variance over masked entries.

    Args:
        x: [B, T] (typically all GAE advantages of the step).
        mask: [B, T] bool/0-1.
        shift_mean: if False the mean is added back (only scaled).
        eps: added to the variance.

    Returns:
        [B, T] whitened values, 0 where mask is 0. Uses the sample variance (n - 1).
    """
    m = mask.bool()
    xf = x.float()
    n = m.sum().clamp_min(1)
    mean = _masked(xf, m).sum() / n
    var = _masked((xf - mean) ** 2, m).sum() / (n - 1).clamp_min(1)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _masked(out, m)


def entropy_modulation(
    advantages: Tensor,
    entropy: Tensor,
    mask: Tensor,
    k: float,
    step_mean: float | Tensor | None = None,
) -> Tensor:
    """EMPG-style modulation: A_t <- A_t g_t, g_t = exp(-k H_t) / mean_step(exp(-k H)).

    Args:
        advantages: [B, T] per-token advantages.
        entropy: [B, T] token entropies (detached internally).
        mask: [B, T] bool/0-1.
        k: sharpness k.
        step_mean: mean of exp(-k H) over all masked tokens of the step; if None it is computed
            from this call's tokens (pass it when the step is split across calls).

    Returns:
        [B, T] modulated advantages, 0 where mask is 0.
    """
    m = mask.bool()
    g = torch.exp(-k * entropy.detach().float())
    if step_mean is None:
        step_mean = _masked(g, m).sum() / m.sum().clamp_min(1)
    return _masked(advantages * (g / step_mean), m)
