"""`posttrain eval` report: hand-computed avg@k across seeds and pooled unbiased pass@k."""

from __future__ import annotations

import math

import pytest

from posttrain.config import load_config
from posttrain.eval.command import build_report, format_table, split_args
from posttrain.eval.evaluate import EvalDetails, summarize
from posttrain.models import build_tokenizer


def test_split_args():
    assert split_args([]) == (None, [])
    assert split_args(["r.yaml", "eval.k=2"]) == ("r.yaml", ["eval.k=2"])
    assert split_args(["eval.k=2"]) == (None, ["eval.k=2"])


def test_report_hand_values():
    # 2 seeds x 2 problems x 2 samples.
    details = EvalDetails(
        greedy=[1.0, 0.0],
        sampled=[[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 0.0]]],
        seeds=[0, 1],
        k=2,
    )
    cfg = load_config(None, ["eval.k=2", "eval.seeds=[0,1]", "rollout.max_new_tokens=4"])
    rows = [{"prompt": "1+2", "answer": "3"}, {"prompt": "2+2", "answer": "4"}]
    report = build_report(details, cfg, "some/model", build_tokenizer(), rows)
    res = report["results"]
    assert res["greedy_acc"]["value"] == 0.5
    avg = res["avg@2"]
    assert [x["accuracy"] for x in avg["per_seed"]] == [0.75, 0.25]
    assert avg["mean"] == pytest.approx(0.5)
    assert avg["std"] == pytest.approx(math.sqrt(0.125))  # ((0.25^2) * 2) / (2 - 1)
    half = 12.7062 * math.sqrt(0.125) / math.sqrt(2)
    assert avg["ci95"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-6)
    # Pooled over seeds: problem 0 has c=1 of n=4, problem 1 has c=3 of n=4.
    assert res["pass@1"]["value"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    p2 = ((1 - math.comb(3, 2) / math.comb(4, 2)) + 1.0) / 2  # 1 - C(n-c,k)/C(n,k)
    assert res["pass@2"]["value"] == pytest.approx(p2)
    assert res["pass@2"]["settings"]["n_samples_per_problem"] == 4
    assert res["avg@2"]["settings"]["example_prompt"] == "<|im_start|>user\n1+2<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    assert report["metrics"] == summarize(details)
    assert report["metrics"]["eval/avg@2_mean"] == pytest.approx(avg["mean"])
    table = format_table(report)
    assert "avg@2" in table and "0.500" in table and "seeds=[0, 1]" in table


def test_report_one_seed_has_no_std():
    details = EvalDetails(greedy=[0.0], sampled=[[[1.0, 0.0, 0.0]]], seeds=[7], k=3)
    cfg = load_config(None, ["eval.k=3", "eval.seeds=[7]"])
    report = build_report(details, cfg, "m", build_tokenizer(), [{"prompt": "1+1", "answer": "2"}])
    avg = report["results"]["avg@3"]
    assert (
        avg["mean"] == pytest.approx(1 / 3) and avg["std"] is None and avg["ci95"] == [None, None]
    )
    assert "avg@3" in format_table(report)
