"""Pure per-turn credit assignment for multi-turn episodes (formulas: docs/algorithms.md,
"Multi-turn credit assignment").

Shapes: P = prompts (groups), G = episodes per group, N = P * G episodes, K = turns (padded to
the longest episode of the step), B = samples of a tensor batch, T = token positions.
Turn k of an episode with n turns is valid for k < n; padded turns hold 0 and are ignored.
Statistics are computed in float64; advantages come back in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.advantages import SEQUENCE_ESTIMATORS, _flat_groups, _masked, _sample_std

# `advantage.credit`: episode advantage on every turn, discounted return-to-go per turn, or the
# final reward spread over turns by reported progress (SPA-RL style), then return-to-go
CREDIT_MODES = ("episode", "return_to_go", "progress")
# `advantage.entropy_modulation_level`: EMPG weights from each token's entropy or its turn's mean
ENTROPY_MODULATION_LEVELS = ("token", "turn")

_F64 = torch.float64


def _turn_mask(n_turns: Tensor, width: int) -> Tensor:
    """[..., K] bool (K = width): turn k exists (k < n_turns)."""
    return torch.arange(width, device=n_turns.device) < n_turns.unsqueeze(-1)


def progress_turn_rewards(final: Tensor, progress: Tensor, n_turns: Tensor) -> Tensor:
    """Spread each episode's final reward F over its turns by progress increments.

    r'_k = F (p_k - p_{k-1}) for k < n - 1 and r'_{n-1} = F (1 - p_{n-2}) (that is, the last
    turn's increment plus the remainder F (1 - p_{n-1})), with p_{-1} = 0, so sum_k r'_k = F.
    Progress is clamped to [0, 1]; a turn that reported none (NaN) keeps the previous value.

    Args:
        final: [N] final rewards F.
        progress: [N, K] reported progress after each turn, NaN where not reported.
        n_turns: [N] turns per episode (>= 1 for an episode with a reward).

    Returns:
        [N, K] float64 per-turn shares, 0 at padded turns.
    """
    f, p = final.to(_F64), progress.to(_F64).clamp(0.0, 1.0)
    N, K = p.shape
    out = torch.zeros(N, K, dtype=_F64, device=p.device)
    prev = torch.zeros(N, dtype=_F64, device=p.device)
    for k in range(K):
        cur = torch.where(torch.isnan(p[:, k]), prev, p[:, k])
        share = torch.where(k == n_turns - 1, f * (1.0 - prev), f * (cur - prev))
        out[:, k] = torch.where(k < n_turns, share, torch.zeros_like(share))
        prev = cur
    return out


def discounted_returns(
    turn_rewards: Tensor, final: Tensor, n_turns: Tensor, gamma: float = 1.0
) -> Tensor:
    """Return-to-go per turn: G_k = sum_{j >= k} gamma^(j - k) r_j + gamma^(n - 1 - k) F.

    Computed backwards: G_{n-1} = r_{n-1} + F, G_k = r_k + gamma G_{k+1}.

    Args:
        turn_rewards: [N, K] per-turn rewards r_k (values at padded turns are ignored).
        final: [N] final rewards F (credited to the last turn).
        n_turns: [N] turns per episode.
        gamma: discount per turn, in (0, 1].

    Returns:
        [N, K] float64 returns, 0 at padded turns.
    """
    r, f = turn_rewards.to(_F64), final.to(_F64)
    N, K = r.shape
    out = torch.zeros(N, K, dtype=_F64, device=r.device)
    nxt = torch.zeros(N, dtype=_F64, device=r.device)
    for k in reversed(range(K)):
        g = torch.where(k == n_turns - 1, r[:, k] + f, r[:, k] + gamma * nxt)
        out[:, k] = torch.where(k < n_turns, g, torch.zeros_like(g))
        nxt = out[:, k]
    return out


def turn_returns(
    rewards: Tensor,
    turn_rewards: Tensor,
    progress: Tensor,
    n_turns: Tensor,
    credit: str,
    gamma: float = 1.0,
) -> Tensor:
    """Each turn's return under a credit mode, from the episode rewards and the turn rewards.

    The episode reward is R = F + sum_k r_k, so the final reward is F = R - sum_{k < n} r_k.
    episode: G_k = R on every turn. return_to_go: `discounted_returns(r, F)`. progress:
    `discounted_returns(r + progress_turn_rewards(F, p), 0)` (F is spread over the turns).

    Args:
        rewards: [N] episode rewards R (the `Sample.reward`s; any value where invalid).
        turn_rewards: [N, K] per-turn rewards (0 where the environment gave none).
        progress: [N, K] reported progress, NaN where none (progress mode only).
        n_turns: [N] turns per episode.
        credit: one of CREDIT_MODES.
        gamma: discount per turn, in (0, 1].

    Returns:
        [N, K] float64 returns G_k, 0 at padded turns.
    """
    if credit not in CREDIT_MODES:
        raise ValueError(f"credit={credit!r} is not valid; choose one of {', '.join(CREDIT_MODES)}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma={gamma} must be in (0, 1]")
    R = rewards.to(_F64)
    K = turn_rewards.shape[1]
    inside = _turn_mask(n_turns, K)
    r = _masked(turn_rewards.to(_F64), inside)
    if credit == "episode":
        return _masked(R.unsqueeze(-1).expand(-1, K), inside)
    final = R - r.sum(-1)
    if credit == "progress":
        r = r + progress_turn_rewards(final, progress, n_turns)
        final = torch.zeros_like(final)
    return discounted_returns(r, final, n_turns, gamma)


def group_baseline_scale(
    returns: Tensor,
    valid: Tensor,
    estimator: str,
    eps: float = 1e-6,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The baseline b, scale s and zero rule that `sequence_advantages` applies to the returns.

    `sequence_advantages(returns, ...)` equals `where(zero, 0, (returns - b) / s)` bit for bit.

    Args:
        returns: [P, G] per-episode values (G_0 for turn credit).
        valid: [P, G] bool.
        estimator: one of SEQUENCE_ESTIMATORS.
        eps: added to the std.
        lengths: [P, G] completion token counts (opo only).

    Returns:
        b: [P, G] float64 baseline; s: [P, G] or broadcastable float64 scale (> 0);
        zero: [P, G] bool, True where the advantage is exactly 0 (invalid, or a flat group).
    """
    if estimator not in SEQUENCE_ESTIMATORS:
        raise ValueError(
            f"estimator={estimator!r} is not valid; choose one of {', '.join(SEQUENCE_ESTIMATORS)}"
        )
    v = valid.bool()
    r = _masked(returns.to(_F64), v)
    n = v.sum(1, keepdim=True)
    group_mean = r.sum(1, keepdim=True) / n.clamp_min(1)
    one = torch.ones((), dtype=_F64, device=r.device)
    if estimator == "grpo":
        b, s = group_mean, _sample_std(r, v, dim=1) + eps
    elif estimator == "dr_grpo":
        b, s = group_mean, one
    elif estimator == "batch_std":
        b, s = group_mean, _sample_std(r, v) + eps
    elif estimator == "rloo":
        b, s = (r.sum(1, keepdim=True) - r) / (n - 1).clamp_min(1), one
    elif estimator == "reinforce_pp":
        b, s = r.sum() / v.sum().clamp_min(1), _sample_std(r, v) + eps
    else:
        if lengths is None:
            raise ValueError("advantage.estimator=opo needs lengths [P, G]")
        w = _masked(lengths.to(_F64), v)
        w_sum = w.sum(1, keepdim=True)
        b = torch.where(w_sum > 0, (w * r).sum(1, keepdim=True) / w_sum.clamp_min(1e-12), 0)
        s = one
    zero = ~v
    if estimator != "reinforce_pp":
        zero = zero | _flat_groups(r, v)
    return b.expand(r.shape), s, zero


def turn_advantages(
    returns: Tensor,
    n_turns: Tensor,
    valid: Tensor,
    estimator: str,
    eps: float = 1e-6,
    lengths: Tensor | None = None,
) -> Tensor:
    """Per-turn advantages A_k = (G_k - b) / s, with the episode-level baseline and scale.

    b and s are what `sequence_advantages` uses, computed from the episodes' first-turn returns
    G_0 (the group's estimate of the task's start value and spread); invalid episodes and flat
    groups (G_0 all equal, or < 2 valid) get 0 on every turn. With G_k = G_0 = R for every turn
    this is exactly the episode-level advantage on every turn.

    Args:
        returns: [P, G, K] per-turn returns G_k (e.g. from `turn_returns`).
        n_turns: [P, G] turns per episode.
        valid: [P, G] bool.
        estimator: one of SEQUENCE_ESTIMATORS.
        eps: added to the std.
        lengths: [P, G] completion token counts (opo only).

    Returns:
        [P, G, K] float32 advantages, 0 at padded turns.
    """
    if returns.dim() != 3 or returns.shape[:2] != valid.shape:
        raise ValueError(f"returns must be [P, G, K] and valid [P, G], got {returns.shape}")
    g = returns.to(_F64)
    b, s, zero = group_baseline_scale(g[..., 0], valid, estimator, eps, lengths)
    if s.dim() == 2:
        s = s.unsqueeze(-1)
    adv = (g - b.unsqueeze(-1)) / s
    keep = ~zero.unsqueeze(-1) & _turn_mask(n_turns, g.shape[-1])
    return _masked(adv, keep).to(torch.float32)


def turn_token_advantages(turn_adv: Tensor, turn_index: Tensor) -> Tensor:
    """Give every token its turn's advantage.

    Args:
        turn_adv: [B, K] per-turn advantages.
        turn_index: [B, T] long, the token's turn (>= 0) or -1 (prompt, padding).

    Returns:
        [B, T] float32 with turn_adv[i, turn_index[i, t]] where turn_index >= 0, else 0.
    """
    idx = turn_index.long()
    has = idx >= 0
    picked = turn_adv.float().gather(1, idx.clamp(0, turn_adv.shape[1] - 1))
    return _masked(picked, has)


def turn_entropy_modulation(
    advantages: Tensor,
    entropy: Tensor,
    mask: Tensor,
    turn_index: Tensor,
    k: float,
    step_mean: float | Tensor | None = None,
) -> Tensor:
    """EMPG per turn: A_t <- A_t g_(turn of t), g_u = exp(-k H_u) / mean over turns exp(-k H).

    H_u is turn u's mean token entropy over its masked tokens; the mean in the denominator runs
    over the turns with at least one masked token (each turn counts once, whatever its length).

    Args:
        advantages: [B, T] per-token advantages.
        entropy: [B, T] token entropies (detached internally).
        mask: [B, T] bool/0-1 (the loss mask: sampled tokens of valid samples).
        turn_index: [B, T] long, the token's turn within its sample (>= 0) or -1.
        k: sharpness k.
        step_mean: mean of exp(-k H_u) over the step's turns; if None it is computed from this
            call's turns (pass it when the step is split across calls).

    Returns:
        [B, T] modulated advantages (float32), 0 where mask is 0.
    """
    idx = turn_index.long()
    m = mask.bool() & (idx >= 0)
    B = idx.shape[0]
    K = max(int(idx.max()) + 1, 1) if idx.numel() else 1
    flat = torch.arange(B, device=idx.device).unsqueeze(-1) * K + idx.clamp_min(0)  # [B, T]
    h = entropy.detach().to(_F64)
    sums = torch.zeros(B * K, dtype=_F64, device=h.device).index_add_(0, flat[m], h[m])
    counts = torch.zeros(B * K, dtype=_F64, device=h.device).index_add_(
        0, flat[m], torch.ones_like(h[m])
    )
    has = counts > 0
    g = torch.exp(-k * sums / counts.clamp_min(1))
    if step_mean is None:
        step_mean = g[has].sum() / has.sum().clamp_min(1)
    weight = (g / step_mean)[flat].to(torch.float32)
    return _masked(advantages.float() * weight, m)
