"""The quickstart recipe at reduced steps, through the CLI and through the Python API."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_runs import REDUCED_QUICKSTART

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "quickstart.yaml"

pytestmark = pytest.mark.slow

REDUCED = [*REDUCED_QUICKSTART, "log.wandb=offline"]


def _greedy_accuracy(model_dir: Path, rows: list[dict], cfg) -> float:
    """Greedy accuracy recomputed by hand: chat-templated prompt, argmax token by token until
    EOS or max_new_tokens, right when the last integer of the text equals the answer."""
    import torch

    from posttrain.data.chat import encode_prompts
    from posttrain.models import load_policy, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_policy(model_dir).eval()
    prompts = encode_prompts(tok, [r["prompt"] for r in rows], cfg.data.system_prompt)
    right = 0
    with torch.no_grad():
        for ids, row in zip(prompts, rows, strict=True):
            out: list[int] = []
            for _ in range(cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens):
                logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
                nxt = int(logits.argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
            numbers = re.findall(r"-?[0-9]+", tok.decode(out, skip_special_tokens=True))
            right += bool(numbers) and int(numbers[-1]) == int(row["answer"])
    return right / len(rows)


def test_quickstart_cli_reduced(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "posttrain.cli", "train", str(RECIPE), f"train.output_dir={out}"]
    proc = subprocess.run(cmd + REDUCED, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # What the quickstart promises to print and write.
    assert f"curves: {out / 'curves.png'}" in proc.stdout
    assert f"checkpoint: {out / 'checkpoints' / 'final'}" in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    assert set(result) == {"before", "after", "settings", "pass_at_k"}
    # the pass@k curves: eval.run_pass_k_max (16) samples per problem and seed, before and after
    curves = result["pass_at_k"]
    assert curves["before"]["k"] == curves["after"]["k"] == [1, 2, 4, 8, 16]
    assert curves["after"]["seeds"] == [0, 1] and curves["after"]["num_problems"] == 16
    assert (out / "pass_at_k.png").is_file() and curves["png"] == str(out / "pass_at_k.png")
    solved = curves["solved"]
    assert (
        f"solved after but never before: {solved['solved_after_not_before']}; "
        f"before but never after: {solved['solved_before_not_after']}"
    ) in proc.stdout
    settings = result["settings"]
    assert settings["seeds"] == [0, 1] and settings["k"] == 4 and settings["num_problems"] == 16
    k, n_problems, n_seeds = 4, 16, 2
    keys = {"eval/greedy_acc", f"eval/avg@{k}_mean", f"eval/avg@{k}_std", f"eval/pass@{k}"}
    assert set(result["before"]) == set(result["after"]) == keys

    # The printed before/after table is eval.json's numbers (3 decimals), one line per metric.
    table = {
        m[1]: (float(m[2]), float(m[3]))
        for m in re.finditer(r"^  (eval/\S+)\s+before\s+(\S+)\s+after\s+(\S+)$", proc.stdout, re.M)
    }
    assert set(table) == keys, proc.stdout[-2000:]
    for key, (before, after) in table.items():
        assert before == pytest.approx(result["before"][key], abs=5e-4), key
        assert after == pytest.approx(result["after"][key], abs=5e-4), key

    # metrics.jsonl: eval before (step 0), 2 steps, eval after (step 2) -- the same numbers.
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 2]
    assert {k2: v for k2, v in lines[0].items() if k2 != "step"} == result["before"]
    assert {k2: v for k2, v in lines[-1].items() if k2 != "step"} == result["after"]

    # The sampled metrics are counts: per-seed accuracies (mean -/+ std / sqrt 2 for 2 seeds)
    # are multiples of 1/(16 x 4); pass@4 (one 0/1 per seed and problem, n = k) of 1/(2 x 16),
    # at least the mean sample accuracy and at most k times it.
    for phase in ("before", "after"):
        r = result[phase]
        mean, std, pass_k = r[f"eval/avg@{k}_mean"], r[f"eval/avg@{k}_std"], r[f"eval/pass@{k}"]
        for acc in (mean - std / math.sqrt(2), mean + std / math.sqrt(2)):
            count = acc * n_problems * k
            assert count == pytest.approx(round(count), abs=1e-6) and 0 <= acc <= 1, (phase, r)
        assert pass_k * n_seeds * n_problems == pytest.approx(round(pass_k * n_seeds * n_problems))
        assert mean - 1e-9 <= pass_k <= min(1.0, k * mean) + 1e-9, (phase, r)

    # Greedy accuracy recomputed from the weights: the start of GRPO (the SFT warm-up's final
    # checkpoint) gives eval.json's "before", the final checkpoint its "after".
    from posttrain.config import load_config
    from posttrain.data.splits import load_eval_rows

    cfg = load_config(RECIPE, [f"train.output_dir={out}", *REDUCED])
    rows = load_eval_rows(cfg)[: cfg.eval.num_problems]
    assert len(rows) == n_problems
    start = out / "sft-warmup" / "checkpoints" / "final"
    assert (start / "model.safetensors").is_file()
    for phase, weights in (("before", start), ("after", out / "checkpoints" / "final")):
        want = _greedy_accuracy(weights, rows, cfg)
        assert result[phase]["eval/greedy_acc"] == pytest.approx(want, abs=1e-9), phase

    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(out.glob("wandb/offline-run-*")), "wandb offline run directory"


def test_python_api(tmp_path):
    from posttrain import Trainer, load_config

    cfg = load_config(
        RECIPE,
        [f"train.output_dir={tmp_path / 'api'}", *REDUCED[:4], "eval.num_problems=0"],
    )
    history = Trainer(cfg).train()
    assert len(history) == 2
    assert history[-1]["weight_version"] == 2.0


def test_bad_input_leaves_nothing(tmp_path):
    out = tmp_path / "never"
    cmd = [sys.executable, "-m", "posttrain.cli", "train", str(RECIPE), f"train.output_dir={out}"]
    proc = subprocess.run([*cmd, "rollout.samples_per_promt=4"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'samples_per_prompt'" in proc.stderr
    assert "Traceback" not in proc.stderr
    # A data problem found after start-up: the prompt column does not exist.
    bad = [*REDUCED, "warmup.steps=0", "data.prompt_column=question"]
    proc = subprocess.run(cmd + bad, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "question" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
