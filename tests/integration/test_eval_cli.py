"""`posttrain eval` on the tiny model: the JSON report's fields, and bad input."""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys

import pytest

from posttrain.cli import main
from posttrain.models import load_tokenizer

ARGS = [
    "data.eval_size=8",
    "eval.num_problems=8",
    "eval.k=2",
    "eval.seeds=[0,1,2]",
    "rollout.max_new_tokens=4",
    "data.max_prompt_tokens=32",
]


@pytest.mark.slow
def test_eval_cli_writes_results_with_settings(tmp_path, tiny_model_dir):
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "posttrain.cli", "eval", str(tiny_model_dir), *ARGS]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "avg@2" in proc.stdout and "pass@2" in proc.stdout and str(out) in proc.stdout
    report = json.loads(out.read_text())
    chat_template = load_tokenizer(tiny_model_dir).chat_template
    assert report["chat_template"] == chat_template
    sha = hashlib.sha256(chat_template.encode()).hexdigest()
    assert report["model"] == str(tiny_model_dir)
    assert report["dataset"]["source"] == "arithmetic" and report["dataset"]["num_problems"] == 8
    assert set(report["results"]) == {"greedy_acc", "avg@2", "pass@1", "pass@2"}
    for name, res in report["results"].items():
        s = res["settings"]
        for key in ("temperature", "top_p", "max_new_tokens", "seeds", "k", "model", "dataset"):
            assert key in s, (name, key)
        assert s["chat_template_sha256"] == sha
        assert s["example_prompt"].startswith("<|im_start|>user\n")
        assert s["max_new_tokens"] == 4 and s["model"] == str(tiny_model_dir)
    assert report["results"]["greedy_acc"]["settings"]["temperature"] == 0.0
    avg = report["results"]["avg@2"]
    assert avg["settings"]["seeds"] == [0, 1, 2] and avg["settings"]["k"] == 2
    per_seed = [x["accuracy"] for x in avg["per_seed"]]
    assert [x["seed"] for x in avg["per_seed"]] == [0, 1, 2]
    assert avg["mean"] == pytest.approx(statistics.fmean(per_seed), abs=1e-12)
    assert avg["std"] == pytest.approx(statistics.stdev(per_seed), abs=1e-12)
    assert avg["ci95"][0] <= avg["mean"] <= avg["ci95"][1]
    # The same numbers as the training loop's eval metrics (one code path).
    assert report["metrics"]["eval/avg@2_mean"] == pytest.approx(avg["mean"], abs=1e-12)
    assert report["results"]["pass@2"]["settings"]["n_samples_per_problem"] == 6


def test_eval_bad_input_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"
    assert main(["eval", str(missing), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(missing) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main(["eval", str(missing), "eval.kk=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'eval.kk'; did you mean 'k'?" in err
    assert main(["eval", str(missing), str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert not (tmp_path / "eval_results.json").exists()
