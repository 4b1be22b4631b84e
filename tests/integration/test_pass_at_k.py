"""pass@k curves end to end on the tiny model: `posttrain eval --before` (two vLLM engines in one
process, the PNG, the JSON fields) and a 1-step training run's final report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from posttrain.eval.statistics import pass_at_k
from tests.tiny_runs import tiny_cfg

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ARGS = [
    "data.eval_size=8",
    "eval.num_problems=8",
    "eval.k=2",
    "eval.seeds=[0,1]",
    "eval.pass_k_max=8",
    "eval.reward=format_number",  # the warmed-up model answers with a number often, not always
    "rollout.max_new_tokens=4",
    "data.max_prompt_tokens=32",
]


def _check_curve(curve: dict, n: int, seeds: list[int], problems: int) -> None:
    """The stored means are the unbiased estimator over the stored counts, seed by seed."""
    counts = curve["correct_counts"]
    assert curve["n_samples_per_problem"] == n and curve["seeds"] == seeds
    assert len(counts) == len(seeds) and all(len(c) == problems for c in counts)
    assert all(0 <= c <= n for row in counts for c in row)
    for j, k in enumerate(curve["k"]):
        per_seed = [sum(pass_at_k(n, c, k) for c in row) / problems for row in counts]
        assert [s["pass_at_k"][j] for s in curve["per_seed"]] == pytest.approx(per_seed)
        assert curve["mean"][j] == pytest.approx(sum(per_seed) / len(per_seed))
        lo, hi = curve["ci95_low"][j], curve["ci95_high"][j]
        assert lo - 1e-12 <= curve["mean"][j] <= hi + 1e-12


@pytest.mark.slow
def test_eval_cli_before_after_curves(tmp_path, tiny_model_dir, eos_model):
    out = tmp_path / "res" / "eval.json"
    cmd = [sys.executable, "-m", "posttrain.cli", "eval", str(eos_model), *ARGS]
    cmd += ["--before", str(tiny_model_dir), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"] == str(eos_model)
    assert report["before"]["model"] == str(tiny_model_dir)
    assert set(report["results"]) == {"greedy_acc", "avg@2", "pass@1", "pass@2"}
    before, after = report["before"]["pass_at_k_curve"], report["pass_at_k_curve"]
    for curve in (before, after):
        assert curve["k"] == [1, 2, 4, 8]
        _check_curve(curve, 8, [0, 1], 8)
        assert curve["settings"]["max_new_tokens"] == 4
    totals = {
        name: [sum(col) for col in zip(*c["correct_counts"], strict=True)]
        for name, c in (("before", before), ("after", after))
    }
    gained = [i for i in range(8) if totals["after"][i] > 0 and totals["before"][i] == 0]
    lost = [i for i in range(8) if totals["before"][i] > 0 and totals["after"][i] == 0]
    solved = report["pass_at_k_solved"]
    assert solved["problems_after_not_before"] == gained
    assert solved["problems_before_not_after"] == lost
    assert solved["solved_after_not_before"] == len(gained)
    assert solved["solved_before_not_after"] == len(lost)
    assert sum(totals["after"]) > 0  # the warmed-up model writes numbers
    png = tmp_path / "res" / "eval.pass_at_k.png"
    assert report["pass_at_k_png"] == str(png) and png.read_bytes()[:8] == PNG_MAGIC
    assert f"solved after but never before: {len(gained)}" in proc.stdout
    assert "    before " in proc.stdout and "    after " in proc.stdout and str(png) in proc.stdout


@pytest.mark.slow
def test_training_run_report_has_pass_at_k(tmp_path, tiny_model_dir, capsys):
    from posttrain.trainer import Trainer

    out = tmp_path / "run"
    extra = ("train.steps=1", "eval.num_problems=8", "eval.seeds=[0,1]", "eval.run_pass_k_max=4")
    Trainer(tiny_cfg(out, tiny_model_dir, *extra)).train()
    printed = capsys.readouterr().out
    doc = json.loads((out / "eval.json").read_text())
    pk = doc["pass_at_k"]
    for name in ("before", "after"):
        assert pk[name]["k"] == [1, 2, 4]
        _check_curve(pk[name], 4, [0, 1], 8)
    assert {"solved_after_not_before", "solved_before_not_after"} <= set(pk["solved"])
    assert (out / "pass_at_k.png").read_bytes()[:8] == PNG_MAGIC
    assert "pass@k (4 samples x 2 seeds per problem, 8 problems" in printed
    assert "solved after but never before:" in printed
    assert f"pass@k curves: {out / 'pass_at_k.png'}" in printed
