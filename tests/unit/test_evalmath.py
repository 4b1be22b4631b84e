"""Tests for posttrain.eval.statistics."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch

from posttrain.eval.statistics import (
    avg_at_k,
    curve_ks,
    curve_over_seeds,
    mean_pass_at_k,
    pass_at_k,
    pass_at_k_curve,
    seed_stats,
    solved_sets,
    t_critical_975,
    total_counts,
)


def _exact_pass_at_k(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_comb_formula():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(
                    float(_exact_pass_at_k(n, c, k)), abs=1e-12
                )


def test_pass_at_k_hand_values_and_edges():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 0)


def test_pass_at_k_stable_for_large_n():
    # C(1000, 100) overflows a float; the product form must still be accurate
    for n, c, k in [(1000, 3, 100), (2000, 1, 1000), (1000, 900, 50)]:
        got = pass_at_k(n, c, k)
        assert math.isfinite(got)
        assert got == pytest.approx(float(_exact_pass_at_k(n, c, k)), rel=1e-9)


def test_mean_pass_at_k():
    assert mean_pass_at_k(4, [1, 0, 4], 1) == pytest.approx((0.25 + 0 + 1) / 3)
    assert mean_pass_at_k([4, 2], [2, 1], 2) == pytest.approx(((1 - 1 / 6) + 1) / 2)
    assert mean_pass_at_k(4, [], 1) == 0.0
    with pytest.raises(ValueError):
        mean_pass_at_k([4], [1, 2], 1)


def test_seed_stats_hand_values():
    st = seed_stats([0.5, 0.6, 0.7])
    assert st.mean == pytest.approx(0.6)
    assert st.std == pytest.approx(0.1)
    half = 4.3027 * 0.1 / math.sqrt(3)
    assert (st.ci_low, st.ci_high) == pytest.approx((0.6 - half, 0.6 + half))
    assert st.n_seeds == 3
    one = seed_stats([0.4])
    assert one.mean == 0.4 and math.isnan(one.std) and math.isnan(one.ci_low)
    with pytest.raises(ValueError):
        seed_stats([])


def test_t_critical_values():
    assert t_critical_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_critical_975(30) == pytest.approx(2.0423, abs=1e-4)
    # Cornish-Fisher beyond the table: reference values of t_{0.975}
    assert t_critical_975(31) == pytest.approx(2.0395, abs=2e-4)
    assert t_critical_975(60) == pytest.approx(2.0003, abs=2e-4)
    assert t_critical_975(120) == pytest.approx(1.9799, abs=2e-4)
    assert t_critical_975(10**6) == pytest.approx(1.95996, abs=1e-4)


def test_avg_at_k_across_seeds():
    # 2 seeds x 2 problems x 2 samples
    correct = [[[1, 0], [1, 1]], [[0, 0], [1, 0]]]
    st = avg_at_k(correct)
    per_seed = [0.75, 0.25]
    assert st.mean == pytest.approx(0.5)
    assert st.std == pytest.approx(math.sqrt(((0.25) ** 2 * 2) / 1))
    half = 12.7062 * st.std / math.sqrt(2)
    assert st.ci_high == pytest.approx(0.5 + half, abs=1e-6)
    assert avg_at_k(torch.tensor(correct, dtype=torch.bool)) == st
    assert sum(per_seed) / 2 == st.mean
    with pytest.raises(ValueError):
        avg_at_k([[1, 0]])


def test_curve_ks():
    assert curve_ks(1) == [1]
    assert curve_ks(2) == [1, 2]
    assert curve_ks(8) == [1, 2, 4, 8]
    assert curve_ks(12) == [1, 2, 4, 8, 12]
    assert curve_ks(64) == [1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(ValueError):
        curve_ks(0)


def _subset_pass_at_k(samples: list[int], k: int) -> Fraction:
    """The share of all k-subsets of one problem's samples holding a correct one."""
    subsets = list(itertools.combinations(samples, k))
    return Fraction(sum(1 for s in subsets if any(s)), len(subsets))


def test_pass_at_k_curve_matches_subset_enumeration():
    rng = random.Random(0)
    for n in range(1, 9):
        problems = [[int(rng.random() < p) for _ in range(n)] for p in (0.0, 0.1, 0.3, 0.7, 1.0)]
        counts = [sum(x) for x in problems]
        ks = curve_ks(n)
        got = pass_at_k_curve(n, counts, ks)
        for k, value in zip(ks, got, strict=True):
            want = sum(_subset_pass_at_k(x, k) for x in problems) / len(problems)
            assert value == pytest.approx(float(want), abs=1e-12), (n, k)


def test_pass_at_k_curve_hand_values():
    # n = 4; c = 1, 0, 4. pass@2 of c = 1: 1 - C(3,2)/C(4,2) = 1/2; pass@4 of c = 1: 1
    got = pass_at_k_curve(4, [1, 0, 4], [1, 2, 4])
    assert got == pytest.approx([(0.25 + 0 + 1) / 3, (0.5 + 0 + 1) / 3, (1 + 0 + 1) / 3])
    assert pass_at_k_curve(4, [], [1, 2]) == [0.0, 0.0]


def test_curve_over_seeds_matches_manual_t_interval():
    # 3 seeds x 2 problems, n = 2 samples each, ks = 1, 2
    counts = [[1, 2], [0, 1], [2, 0]]
    cs = curve_over_seeds(2, counts, [1, 2])
    # pass@1 = c / 2; pass@2 = 1 when c >= 1
    per_seed = [[(0.5 + 1) / 2, 1.0], [(0 + 0.5) / 2, 0.5], [(1 + 0) / 2, 0.5]]
    assert cs.ks == [1, 2]
    for got, want in zip(cs.per_seed, per_seed, strict=True):
        assert got == pytest.approx(want)
    for j in range(2):
        col = [row[j] for row in per_seed]
        mean = sum(col) / 3
        sd = math.sqrt(sum((v - mean) ** 2 for v in col) / 2)
        half = 4.3027 * sd / math.sqrt(3)  # t_{0.975, 2}
        st = cs.stats[j]
        assert (st.mean, st.std) == pytest.approx((mean, sd))
        assert (st.ci_low, st.ci_high) == pytest.approx((mean - half, mean + half), abs=1e-9)
    one = curve_over_seeds(2, [[1, 2]], [1, 2])
    assert one.stats[0].mean == pytest.approx(0.75) and math.isnan(one.stats[0].ci_low)
    with pytest.raises(ValueError):
        curve_over_seeds(2, [], [1])


def test_total_counts_and_solved_sets_against_loop():
    assert total_counts([[1, 0, 2], [0, 0, 1]]) == [1, 0, 3]
    assert total_counts([]) == []
    rng = random.Random(1)
    before = [rng.choice([0, 0, 1, 3]) for _ in range(200)]
    after = [rng.choice([0, 1, 1, 4]) for _ in range(200)]
    s = solved_sets(before, after)
    gained, lost, both, neither = [], [], 0, 0
    for i in range(200):
        if after[i] > 0 and before[i] == 0:
            gained.append(i)
        elif before[i] > 0 and after[i] == 0:
            lost.append(i)
        elif before[i] > 0 and after[i] > 0:
            both += 1
        else:
            neither += 1
    assert (s.gained, s.lost, s.both, s.neither) == (gained, lost, both, neither)
    assert gained and lost  # the draw exercises both directions
    hand = solved_sets([0, 2, 0, 1], [3, 0, 0, 1])
    assert (hand.gained, hand.lost, hand.both, hand.neither) == ([0], [1], 1, 1)
    with pytest.raises(ValueError):
        solved_sets([0], [0, 1])
