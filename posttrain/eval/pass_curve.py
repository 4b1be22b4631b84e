"""pass@k curves: k = 1, 2, 4, ... from the same n samples per problem, per seed, with a 95%
t-interval over seeds; before/after in one PNG; the problems solved after but never before.

"The Invisible Leash" (Wu et al., 2025) and "Adaptive Guidance" (Nath et al., 2025) read these
curves to tell RL that moves pass@k into pass@1 (the curves meet at large k) from RL that solves
new problems (the after curve stays above at large k, and problems move from never to sometimes
solved). The math is in `posttrain.eval.statistics`; this module turns counts into the JSON
document, text lines and the PNG used by `posttrain eval` and a training run's final report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.config import Config
from posttrain.eval.statistics import curve_ks, curve_over_seeds, solved_sets, total_counts
from posttrain.runtime.logging import save_figure

ESTIMATOR = "unbiased 1-C(n-c,k)/C(n,k) per seed; mean and 95% t-interval across seeds"
PNG_NAME = "pass_at_k.png"


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def curve_doc(
    counts: Sequence[Sequence[int]], n: int, seeds: Sequence[int], settings: dict[str, Any]
) -> dict[str, Any]:
    """The JSON document of one model's pass@k curve.

    Args:
        counts: [S][P] correct samples of each problem among that seed's n.
        n: samples per problem per seed (the largest k).
        seeds: the S sampling seeds.
        settings: decoding settings to record (temperature, top_p, max_new_tokens, ...).

    Returns:
        k [K]; mean, std, ci95_low, ci95_high [K] (None where undefined, one seed); per_seed
        curves; `solved` (problems with any correct sample); the counts; estimator and settings.
    """
    ks = curve_ks(n)
    cs = curve_over_seeds(n, counts, ks)
    return {
        "k": ks,
        "mean": [s.mean for s in cs.stats],
        "std": [_none_if_nan(s.std) for s in cs.stats],
        "ci95_low": [_none_if_nan(s.ci_low) for s in cs.stats],
        "ci95_high": [_none_if_nan(s.ci_high) for s in cs.stats],
        "per_seed": [{"seed": s, "pass_at_k": c} for s, c in zip(seeds, cs.per_seed, strict=True)],
        "n_samples_per_problem": n,
        "seeds": list(seeds),
        "num_problems": len(counts[0]),
        "solved": sum(1 for c in total_counts(counts) if c > 0),
        "correct_counts": [list(map(int, c)) for c in counts],
        "estimator": ESTIMATOR,
        "settings": settings,
    }


def run_curves(cfg: Config, counts: dict[str, list[list[int]] | None]) -> dict[str, dict[str, Any]]:
    """A training run's curves: `curve_doc` of each label's counts of `eval.run_pass_k_max`
    samples per problem and seed; labels whose counts are None are left out.

    Args:
        cfg: the run config (`eval.*`, `rollout.max_new_tokens`).
        counts: label ("before", "after") -> [S][P] correct counts, or None.
    """
    ev = cfg.eval
    settings = {
        "temperature": ev.temperature,
        "top_p": ev.top_p,
        "max_new_tokens": ev.max_new_tokens or cfg.rollout.max_new_tokens,
        "reward": ev.reward,
    }
    return {
        label: curve_doc(c, ev.run_pass_k_max, ev.seeds, settings)
        for label, c in counts.items()
        if c is not None
    }


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Problems solved after but never before (any of their samples correct) and the reverse.

    Args:
        before, after: `curve_doc` documents of the same problems.

    Returns:
        Counts `solved_after_not_before`, `solved_before_not_after`, `solved_both`,
        `solved_neither`, and the problem indices of the first two.
    """
    s = solved_sets(total_counts(before["correct_counts"]), total_counts(after["correct_counts"]))
    return {
        "solved_after_not_before": len(s.gained),
        "solved_before_not_after": len(s.lost),
        "solved_both": s.both,
        "solved_neither": s.neither,
        "problems_after_not_before": s.gained,
        "problems_before_not_after": s.lost,
        "samples_per_problem": {
            "before": before["n_samples_per_problem"] * len(before["seeds"]),
            "after": after["n_samples_per_problem"] * len(after["seeds"]),
        },
    }


def _cell(doc: dict[str, Any], j: int) -> str:
    lo, hi = doc["ci95_low"][j], doc["ci95_high"][j]
    half = "" if lo is None else f"±{(hi - lo) / 2:.3f}"
    return f"{doc['mean'][j]:.3f}{half}"


def format_lines(curves: dict[str, dict[str, Any]], solved: dict[str, Any] | None) -> list[str]:
    """Text lines: one row of pass@k (mean ± 95% half-width) per curve, then the solved counts.

    Args:
        curves: label -> `curve_doc` (e.g. "before", "after"), drawn in this order.
        solved: `compare(before, after)`, or None.
    """
    first = next(iter(curves.values()))
    ks = max((d["k"] for d in curves.values()), key=len)
    lines = [
        f"  pass@k ({first['n_samples_per_problem']} samples x {len(first['seeds'])} seeds per "
        f"problem, {first['num_problems']} problems; mean ± 95% t-interval over seeds)",
        "    " + f"{'k':<8}" + "".join(f"{k:>13}" for k in ks),
    ]
    for label, doc in curves.items():
        cells = "".join(f"{_cell(doc, j):>13}" for j in range(len(doc["k"])))
        lines.append(f"    {label:<8}{cells}")
    if solved is not None:
        lines.append(
            f"  solved after but never before: {solved['solved_after_not_before']}; "
            f"before but never after: {solved['solved_before_not_after']} "
            f"(both {solved['solved_both']}, neither {solved['solved_neither']})"
        )
    return lines


def plot(
    curves: dict[str, dict[str, Any]],
    png_path: str | Path,
    title: str = "",
    solved: dict[str, Any] | None = None,
) -> Path:
    """Draw pass@k against k (log2 axis) with the 95% band over seeds, one line per curve.

    The PNG is written to a temporary file and renamed, so readers never see a partial image.

    Args:
        curves: label -> `curve_doc` (e.g. "before", "after").
        png_path: the image to write.
        title: figure title.
        solved: `compare(before, after)`: its two counts are written in the plot.

    Returns:
        `png_path` as a Path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, doc in curves.items():
        (line,) = ax.plot(doc["k"], doc["mean"], marker="o", linewidth=1.5, label=label)
        if doc["ci95_low"][0] is not None:
            lo = [max(0.0, v) for v in doc["ci95_low"]]
            hi = [min(1.0, v) for v in doc["ci95_high"]]
            ax.fill_between(doc["k"], lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ks = max((d["k"] for d in curves.values()), key=len)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k (mean over seeds, 95% band)")
    if solved is not None:
        note = (
            f"solved after, never before: {solved['solved_after_not_before']}\n"
            f"solved before, never after: {solved['solved_before_not_after']}"
        )
        ax.text(0.02, 0.97, note, transform=ax.transAxes, va="top", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, png_path)
