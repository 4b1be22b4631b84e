"""The quickstart recipe at reduced steps, through the CLI and through the Python API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "quickstart.yaml"

pytestmark = pytest.mark.slow

REDUCED = [
    "warmup.steps=20",
    "train.steps=2",
    "rollout.prompts_per_step=4",
    "train.micro_batch_size_per_device=32",
    "eval.num_problems=16",
    "eval.seeds=[0,1]",
    "log.wandb=offline",
]


def test_quickstart_cli_reduced(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "posttrain.cli", "train", str(RECIPE), f"train.output_dir={out}"]
    proc = subprocess.run(cmd + REDUCED, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # What the quickstart promises to print and write.
    assert "eval/greedy_acc" in proc.stdout and "before" in proc.stdout
    assert f"curves: {out / 'curves.png'}" in proc.stdout
    assert f"checkpoint: {out / 'checkpoints' / 'final'}" in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    assert set(result) == {"before", "after", "settings"}
    assert result["settings"]["seeds"] == [0, 1] and result["settings"]["k"] == 4
    for phase in ("before", "after"):
        assert 0.0 <= result[phase]["eval/greedy_acc"] <= 1.0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sft-warmup" / "checkpoints" / "final" / "model.safetensors").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 2]  # eval before, 2 steps, eval after
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
