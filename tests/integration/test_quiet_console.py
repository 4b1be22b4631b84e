"""The quickstart's console: progress bars, the before/after table and the output paths; what vLLM,
DeepSpeed and Triton print goes to <output_dir>/third_party.log (log.verbose=true shows it too)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_runs import REDUCED_QUICKSTART

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "quickstart.yaml"

pytestmark = pytest.mark.slow

REDUCED = [*REDUCED_QUICKSTART, "log.wandb=disabled"]
# What the third-party libraries print: vLLM's "(MainProcess pid=1) INFO 12-04 18:13:12
# [layerwise.py:266] ..." lines, DeepSpeed's op builder, Triton, torch's C++ warnings,
# Python warnings from their code, vLLM's weight-loading bar.
NOISE = re.compile(
    r"\b(INFO|WARNING|DEBUG)\b|\[layerwise\.py|pid=\d+|DeepSpeed|Triton|NUMA|FutureWarning"
    r"|Loading safetensors"
)


def _train(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    cmd = [sys.executable, "-m", "posttrain.cli", "train", str(RECIPE), f"train.output_dir={out}"]
    proc = subprocess.run(
        [*cmd, *REDUCED, *extra],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=out.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, (proc.stdout + proc.stderr).split("\n")  # a progress bar redraws with \r


def test_console_shows_progress_table_and_paths_only(tmp_path):
    out = tmp_path / "qs"
    proc, lines = _train(out)
    noisy = [line for line in lines if NOISE.search(line)]
    assert not noisy, "\n".join(noisy)
    # what the user should see
    assert "grpo:" in proc.stderr and "100%" in proc.stderr  # the progress bars
    for metric in ("eval/greedy_acc", "eval/pass@4"):
        row = next(line for line in proc.stdout.splitlines() if metric in line)
        assert "before" in row and "after" in row
    assert f"eval results + settings: {out / 'eval.json'}" in proc.stdout
    assert f"curves: {out / 'curves.png'}" in proc.stdout
    assert f"checkpoint: {out / 'checkpoints' / 'final'}" in proc.stdout
    rest = [x for x in lines if x.strip() and not re.match(r"\s*(sft|grpo):\s+\d+%", x)]
    # 3 lines for the warm-up, 9 for the run, 6 for its pass@k curves
    assert len(rest) <= 18, "\n".join(rest)
    # ... and where the rest went: one file for the run, warm-up included
    log = (out / "third_party.log").read_text()
    assert re.search(r"\) WARNING .* \[layerwise\.py:\d+\] RotaryEmbedding", log)
    assert re.search(r"\) INFO .* Reloading and processing weights took", log)
    assert "Successfully reset prefix cache" in log
    assert "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" in log
    assert "Triton" in log and "Loading safetensors checkpoint shards" in log
    assert not (out / "sft-warmup" / "third_party.log").exists()


def test_verbose_shows_third_party_logs_on_the_console(tmp_path):
    out = tmp_path / "verbose"
    proc, lines = _train(out, "log.verbose=true", "warmup.steps=0", "eval.num_problems=0")
    console = "\n".join(lines)
    assert re.search(r"\) WARNING .* \[layerwise\.py:\d+\] RotaryEmbedding", console)
    assert "Reloading and processing weights took" in console
    assert "Reloading and processing weights took" in (out / "third_party.log").read_text()
    assert f"checkpoint: {out / 'checkpoints' / 'final'}" in proc.stdout
