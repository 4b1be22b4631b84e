"""The soak's memory-growth figure (benchmarks/soak.py): least-squares slope, % per 100 steps."""

from __future__ import annotations

from benchmarks.soak import fit, growth


def test_slope_of_a_known_line_and_its_growth_per_100_steps():
    # RSS 100 000 kB at step 20, +50 kB per step, with a +-7 kB zigzag that the fit averages out
    samples = [
        {"step": s, "rss_kb": 100_000 + 50 * (s - 20) + (7 if s % 2 else -7)} for s in range(200)
    ]
    assert abs(fit([(float(s), 3.0 * s + 1.0) for s in range(10)]) - 3.0) < 1e-12
    g = growth(samples, first=20)
    assert g["from_step"] == 20 and g["to_step"] == 199
    # slope ~50 kB/step on a base of 100 000 - 7 kB (step 20 is even): 5% per 100 steps
    assert abs(g["kb_per_step"] - 50) < 0.1
    assert abs(g["pct_per_100_steps"] - 100 * 50 * 100 / (100_000 - 7)) < 0.01
    assert growth(samples, first=20, last=21) is None  # too few points for a slope
