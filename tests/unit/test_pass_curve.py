"""pass@k curve documents, the before/after comparison, the PNG, `posttrain eval`'s report with
`--before` and a training run's final report (hand-computed counts, no model)."""

from __future__ import annotations

import json
import math

import pytest

from posttrain.config import load_config
from posttrain.eval import pass_curve
from posttrain.eval.command import build_report, format_table
from posttrain.eval.evaluate import EvalDetails
from posttrain.eval.report import RunResult, finish
from posttrain.models import build_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# 2 seeds x 3 problems, n = 4 samples per problem and seed
BEFORE = [[0, 1, 0], [0, 2, 0]]
AFTER = [[4, 0, 1], [3, 0, 0]]


def _p(c: int, k: int, n: int = 4) -> float:
    return 1 - math.comb(n - c, k) / math.comb(n, k)


def test_curve_doc_hand_values():
    doc = pass_curve.curve_doc(AFTER, 4, [0, 1], {"temperature": 1.0})
    assert doc["k"] == [1, 2, 4]
    seed0 = [(_p(4, k) + _p(0, k) + _p(1, k)) / 3 for k in (1, 2, 4)]
    seed1 = [(_p(3, k) + 0 + 0) / 3 for k in (1, 2, 4)]
    assert doc["per_seed"][0] == {"seed": 0, "pass_at_k": pytest.approx(seed0)}
    assert doc["per_seed"][1]["pass_at_k"] == pytest.approx(seed1)
    for j in range(3):
        mean = (seed0[j] + seed1[j]) / 2
        sd = abs(seed0[j] - seed1[j]) / math.sqrt(2)  # sample std of two values
        half = 12.7062 * sd / math.sqrt(2)
        assert doc["mean"][j] == pytest.approx(mean)
        assert doc["std"][j] == pytest.approx(sd)
        assert [doc["ci95_low"][j], doc["ci95_high"][j]] == pytest.approx(
            [mean - half, mean + half], abs=1e-6
        )
    assert doc["solved"] == 2 and doc["num_problems"] == 3
    assert doc["correct_counts"] == AFTER and doc["n_samples_per_problem"] == 4
    one = pass_curve.curve_doc([[1]], 2, [5], {})
    assert one["k"] == [1, 2] and one["std"] == [None, None] and one["ci95_low"] == [None, None]


def test_compare_counts_any_sample_over_seeds():
    before = pass_curve.curve_doc(BEFORE, 4, [0, 1], {})
    after = pass_curve.curve_doc(AFTER, 4, [0, 1], {})
    got = pass_curve.compare(before, after)
    # totals over seeds: before [0, 3, 0], after [7, 0, 1]
    assert got["solved_after_not_before"] == 2 and got["problems_after_not_before"] == [0, 2]
    assert got["solved_before_not_after"] == 1 and got["problems_before_not_after"] == [1]
    assert got["solved_both"] == 0 and got["solved_neither"] == 0
    assert got["samples_per_problem"] == {"before": 8, "after": 8}


def test_format_lines_and_plot(tmp_path):
    curves = {
        "before": pass_curve.curve_doc(BEFORE, 4, [0, 1], {}),
        "after": pass_curve.curve_doc(AFTER, 4, [0, 1], {}),
    }
    solved = pass_curve.compare(curves["before"], curves["after"])
    lines = pass_curve.format_lines(curves, solved)
    assert "4 samples x 2 seeds per problem, 3 problems" in lines[0]
    assert lines[1].split() == ["k", "1", "2", "4"]
    assert lines[2].split()[0] == "before" and lines[3].split()[0] == "after"
    assert lines[3].split()[1].startswith(f"{curves['after']['mean'][0]:.3f}±")
    assert lines[4] == (
        "  solved after but never before: 2; before but never after: 1 (both 0, neither 0)"
    )
    png = pass_curve.plot(curves, tmp_path / "sub" / "pass_at_k.png", title="t")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in png.parent.iterdir()] == ["pass_at_k.png"]  # no temporary left


def _report(counts, greedy):
    details = EvalDetails(
        greedy=greedy, sampled=[[[1.0, 0.0]] * 3, [[0.0, 0.0]] * 3], seeds=[0, 1], k=2
    )
    cfg = load_config(None, ["eval.k=2", "eval.seeds=[0,1]", "eval.pass_k_max=4"])
    rows = [{"prompt": f"{i}+1", "answer": str(i + 1)} for i in range(3)]
    return build_report(details, cfg, "m", build_tokenizer(), rows, counts)


def test_eval_report_curve_and_table_with_before():
    after = _report(AFTER, [1.0, 0.0, 0.0])
    assert "pass_at_k_curve" not in _report(None, [0.0] * 3)
    curve = after["pass_at_k_curve"]
    assert curve["k"] == [1, 2, 4] and curve["seeds"] == [0, 1]
    s = curve["settings"]
    assert s["temperature"] == 1.0 and s["max_new_tokens"] == 16 and s["model"] == "m"
    assert curve["mean"] == pass_curve.curve_doc(AFTER, 4, [0, 1], {})["mean"]
    before = _report(BEFORE, [0.0] * 3)
    after["before"] = before
    after["pass_at_k_solved"] = pass_curve.compare(before["pass_at_k_curve"], curve)
    after["pass_at_k_png"] = "x.png"
    table = format_table(after)
    assert "[posttrain] eval (before) m on" in table and "[posttrain] eval (after) m on" in table
    assert "    before " in table and "    after " in table
    assert "solved after but never before: 2; before but never after: 1" in table
    assert table.endswith("  pass@k curves: x.png")


def test_run_report_writes_curves(tmp_path, capsys):
    cfg = load_config(None, ["eval.seeds=[0,1]", "eval.run_pass_k_max=4"])
    curves = pass_curve.run_curves(cfg, {"before": BEFORE, "after": AFTER})
    assert curves["after"]["settings"]["reward"] == "exact_answer"
    assert pass_curve.run_curves(cfg, {"before": None, "after": AFTER}).keys() == {"after"}
    result = RunResult(
        algorithm="grpo",
        steps=2,
        output_dir=tmp_path,
        eval_before={"eval/greedy_acc": 0.25},
        eval_after={"eval/greedy_acc": 0.5},
        eval_settings={"k": 4},
        pass_curves=curves,
    )
    finish(result)
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "eval.json").read_text())
    pk = doc["pass_at_k"]
    assert pk["before"]["correct_counts"] == BEFORE and pk["after"]["k"] == [1, 2, 4]
    assert pk["solved"]["solved_after_not_before"] == 2
    assert pk["solved"]["solved_before_not_after"] == 1
    assert (tmp_path / "pass_at_k.png").read_bytes()[:8] == PNG_MAGIC
    assert pk["png"] == str(tmp_path / "pass_at_k.png")
    assert "solved after but never before: 2; before but never after: 1" in out
    assert f"pass@k curves: {tmp_path / 'pass_at_k.png'}" in out


def test_run_report_without_curves_is_unchanged(tmp_path):
    finish(RunResult("grpo", 1, tmp_path, {"a": 1.0}, {"a": 2.0}, {"k": 4}))
    assert "pass_at_k" not in json.loads((tmp_path / "eval.json").read_text())
    assert not (tmp_path / "pass_at_k.png").exists()
