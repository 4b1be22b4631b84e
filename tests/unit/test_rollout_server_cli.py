"""`posttrain rollout-server`: the vLLM command line it runs (nothing is started)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import cli
from posttrain.rollout.vllm_server import WEIGHT_TRANSFERS


def _run(monkeypatch, capsys, *args: str) -> tuple[list[str], dict[str, str], str]:
    """(argv, env, stdout) of `posttrain rollout-server ARGS`, with subprocess.call faked."""
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    assert cli.main(["rollout-server", *args]) == 0
    ((cmd, env),) = calls
    return cmd, env, capsys.readouterr().out


def _model(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text("{}")  # all `resolve_model_path` checks
    return str(tmp_path)


def _option(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_nccl_weight_transfer_adds_the_transfer_config(monkeypatch, capsys, tmp_path: Path):
    model = _model(tmp_path)
    cmd, env, out = _run(
        monkeypatch, capsys, model, "--port", "8123", "--weight-transfer", "nccl", "--seed", "3"
    )
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert _option(cmd, "--model") == model
    assert cmd.count("--port") == 1 and _option(cmd, "--port") == "8123"
    assert cmd[-2:] == ["--seed", "3"]  # not posttrain's: passed on to vLLM
    assert json.loads(_option(cmd, "--weight-transfer-config")) == {"backend": "nccl"}
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert "rollout.server_weight_transfer=nccl" in out
    assert "rollout.server_url=http://127.0.0.1:8123" in out


def test_file_weight_transfer_is_the_default(monkeypatch, capsys, tmp_path: Path):
    cmd, _, out = _run(
        monkeypatch, capsys, _model(tmp_path), "--max-model-len", "256", "--", "--max-num-seqs", "4"
    )
    assert "--weight-transfer-config" not in cmd
    assert _option(cmd, "--max-model-len") == "256"
    assert "server_weight_transfer" not in out
    assert cmd[-2:] == ["--max-num-seqs", "4"]


def test_weight_transfer_choices_match_the_engine(capsys):
    action = next(
        a
        for sub in cli._parser()._subparsers._group_actions[0].choices.values()
        for a in sub._actions
        if a.dest == "weight_transfer"
    )
    assert tuple(action.choices) == WEIGHT_TRANSFERS
    with pytest.raises(SystemExit):
        cli.main(["rollout-server", "m", "--weight-transfer", "rdma"])
    assert "invalid choice: 'rdma'" in capsys.readouterr().err
    # only rollout-server passes unknown arguments on: elsewhere one line and exit code 2
    assert cli.main(["make-tiny", "out", "--port", "1"]) == 2
    assert "unrecognized arguments: --port 1" in capsys.readouterr().err
