"""Evaluation statistics: unbiased pass@k and its curve over k, avg@k across seeds with a 95%
CI, and the problems solved after but never before training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Two-sided 95% Student-t critical values t_{0.975, df} for df = 1..30.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959963984540054


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n - c, k) / C(n, k), in the stable product form.

    C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i).

    Args:
        n: samples drawn for the problem (>= 1).
        c: correct samples (0 <= c <= n).
        k: k (1 <= k <= n).

    Returns:
        pass@k in [0, 1].
    """
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n, 1 <= k <= n; got {n}, {c}, {k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(n: int | Sequence[int], c: Sequence[int], k: int) -> float:
    """Mean unbiased pass@k over problems.

    Args:
        n: samples per problem (one int for all, or one per problem).
        c: correct samples per problem.
        k: k.

    Returns:
        The mean over problems (0.0 for no problems).
    """
    ns = [n] * len(c) if isinstance(n, int) else list(n)
    if len(ns) != len(c):
        raise ValueError(f"n and c must have the same length, got {len(ns)} and {len(c)}")
    if not c:
        return 0.0
    return sum(pass_at_k(ni, ci, k) for ni, ci in zip(ns, c, strict=True)) / len(c)


def t_critical_975(df: int) -> float:
    """Two-sided 95% Student-t critical value (table for df <= 30, Cornish-Fisher beyond)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


@dataclass(frozen=True)
class SeedStats:
    """Mean over seeds, sample std (n - 1) and a 95% t-interval of the mean.

    With one seed, std and the CI bounds are nan.
    """

    mean: float
    std: float
    ci_low: float
    ci_high: float
    n_seeds: int


def seed_stats(values: Sequence[float]) -> SeedStats:
    """Summarise one metric measured once per seed.

    Args:
        values: the metric per seed (S >= 1).

    Returns:
        SeedStats with mean, sample std and mean +- t_{0.975, S-1} std / sqrt(S).
    """
    s = len(values)
    if s == 0:
        raise ValueError("seed_stats needs at least one value")
    mean = math.fsum(values) / s
    if s < 2:
        return SeedStats(mean, math.nan, math.nan, math.nan, s)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (s - 1))
    half = t_critical_975(s - 1) * std / math.sqrt(s)
    return SeedStats(mean, std, mean - half, mean + half, s)


def avg_at_k(correct: Sequence | torch.Tensor) -> SeedStats:
    """avg@k repeated over seeds.

    Args:
        correct: [S, P, K] correctness (bool/0-1) for S seeds, P problems, K samples each
            (nested lists or a tensor; rectangular).

    Returns:
        SeedStats over the S per-seed avg@k values (mean accuracy over all P * K samples).
    """
    t = torch.as_tensor(correct, dtype=torch.float64)
    if t.dim() != 3 or t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"avg_at_k needs a non-empty [S, P, K] array, got shape {tuple(t.shape)}")
    per_seed = t.mean(dim=(1, 2)).tolist()
    return seed_stats(per_seed)


def curve_ks(k_max: int) -> list[int]:
    """The k of a pass@k curve: 1, 2, 4, ... (powers of two) up to `k_max`, then `k_max` itself
    when it is not a power of two.

    Args:
        k_max: the largest k (>= 1), the samples drawn per problem.

    Returns:
        Increasing k values, e.g. 1, 2, 4, 8 for 8 and 1, 2, 4, 8, 12 for 12.
    """
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    ks = [1 << i for i in range(k_max.bit_length()) if 1 << i <= k_max]
    return ks if ks[-1] == k_max else [*ks, k_max]


def pass_at_k_curve(n: int, correct_counts: Sequence[int], ks: Sequence[int]) -> list[float]:
    """Mean unbiased pass@k over problems for every k, all from the same n samples per problem.

    Args:
        n: samples drawn per problem.
        correct_counts: [P] correct samples of each problem (0 <= c <= n).
        ks: [K] values of k, each in [1, n].

    Returns:
        [K] mean over problems of 1 - C(n - c, k) / C(n, k) (0.0 for each k without problems).
    """
    return [mean_pass_at_k(n, correct_counts, k) for k in ks]


@dataclass(frozen=True)
class CurveStats:
    """A pass@k curve measured once per seed, and its mean and 95% t-interval over seeds.

    Attributes:
        ks: [K] values of k.
        per_seed: [S][K] the curve of each seed.
        stats: [K] SeedStats over the S per-seed values at each k (nan std and CI for S = 1).
    """

    ks: list[int]
    per_seed: list[list[float]]
    stats: list[SeedStats]


def curve_over_seeds(n: int, counts: Sequence[Sequence[int]], ks: Sequence[int]) -> CurveStats:
    """The pass@k curve of each seed's n samples, then mean and 95% t-interval across seeds.

    Args:
        n: samples per problem per seed.
        counts: [S][P] correct samples of each problem among that seed's n.
        ks: [K] values of k, each in [1, n].

    Returns:
        CurveStats: per-seed curves [S][K] and `seed_stats` of each column.
    """
    if not counts:
        raise ValueError("curve_over_seeds needs at least one seed")
    per_seed = [pass_at_k_curve(n, c, ks) for c in counts]
    stats = [seed_stats([curve[j] for curve in per_seed]) for j in range(len(ks))]
    return CurveStats(list(ks), per_seed, stats)


def total_counts(counts: Sequence[Sequence[int]]) -> list[int]:
    """[S][P] correct counts per seed -> [P] correct counts over all seeds' samples."""
    if not counts:
        return []
    return [sum(col) for col in zip(*counts, strict=True)]


@dataclass(frozen=True)
class SolvedSets:
    """Which problems two evaluations solve, a problem being solved when any sample is correct.

    Attributes:
        gained: indices solved after but never before (c_after > 0, c_before = 0).
        lost: indices solved before but never after (c_before > 0, c_after = 0).
        both: problems solved by both.
        neither: problems solved by neither.
    """

    gained: list[int]
    lost: list[int]
    both: int
    neither: int


def solved_sets(before: Sequence[int], after: Sequence[int]) -> SolvedSets:
    """Compare the problems solved before and after training.

    Args:
        before: [P] correct samples of each problem before (over all its samples).
        after: [P] the same after, for the same problems in the same order.

    Returns:
        SolvedSets: gained and lost problem indices, and the counts solved by both and neither.
    """
    if len(before) != len(after):
        raise ValueError(f"before and after differ in length: {len(before)} vs {len(after)}")
    gained = [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if a > 0 and b == 0]
    lost = [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if b > 0 and a == 0]
    both = sum(1 for b, a in zip(before, after, strict=True) if a > 0 and b > 0)
    return SolvedSets(gained, lost, both, len(before) - len(gained) - len(lost) - both)
