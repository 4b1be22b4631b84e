"""Tests for posttrain.eval.statistics."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from posttrain.eval.statistics import (
    avg_at_k,
    mean_pass_at_k,
    pass_at_k,
    seed_stats,
    t_critical_975,
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
