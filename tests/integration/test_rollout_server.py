"""`rollout.engine: server` against one real vLLM OpenAI server process (tiny model, CPU).

One module-scoped server (about 30 s to start), launched with `server_command` (what
`posttrain rollout-server` runs). The last test kills it, so it must stay last in the file.
"""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch

from posttrain.models import load_policy, load_tokenizer
from posttrain.rollout.engine import SamplingConfig
from posttrain.rollout.vllm_server import RolloutServerError, ServerEngine
from tests.servers import max_logprob_error, rollout_server, stop
from tests.tiny_runs import tiny_cfg

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]

TIMEOUT_S = 30.0
TEMPERATURE = 0.8
SAMPLING = SamplingConfig(n=3, temperature=TEMPERATURE, max_new_tokens=8, seed=11)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """(url, process) of a rollout server on the tiny model; always stopped afterwards."""
    with rollout_server(tiny_model_dir, tmp_path_factory.mktemp("rollout-server")) as started:
        yield started


def _prompts(model_dir: Path) -> list[list[int]]:
    tok = load_tokenizer(str(model_dir))
    return [tok(t)["input_ids"] for t in ("What is 2 + 3?", "hello", "Count: 1 2 3")]


def _engine(url: str, model_dir: Path, weights_dir: Path) -> ServerEngine:
    engine = ServerEngine(
        url,
        weights_dir=weights_dir,
        timeout_s=TIMEOUT_S,
        tokenizer=load_tokenizer(str(model_dir)),
    )
    engine.load_from_path(model_dir, 0)  # earlier tests may have pushed other weights
    return engine


def test_generate_then_sync_matches_trainer_logprobs(server, tiny_model_dir, tmp_path):
    url, _ = server
    engine = _engine(url, tiny_model_dir, tmp_path / "weights")
    prompts = _prompts(tiny_model_dir)
    model = load_policy(str(tiny_model_dir), dtype="float32").eval()

    rollouts = engine.generate(prompts, SAMPLING)
    assert len(rollouts) == len(prompts) * SAMPLING.n
    assert [r.prompt_index for r in rollouts] == [i for i in range(3) for _ in range(3)]
    for r in rollouts:
        assert r.weight_version == 0 and r.finish_reason in ("stop", "length")
        assert len(r.completion_ids) == len(r.logprobs) >= 1
    assert max_logprob_error(model, rollouts, TEMPERATURE) < 1e-4
    # The same seed gives the same samples.
    again = engine.generate(prompts, SAMPLING)
    assert [r.completion_ids for r in again] == [r.completion_ids for r in rollouts]

    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    assert (
        max_logprob_error(model, rollouts, TEMPERATURE) > 1e-2
    )  # the server still has the old weights
    seconds = engine.load_weights(model.state_dict().items(), 1)
    assert seconds > 0 and engine.weight_version == 1
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["v1"]
    synced = engine.generate(prompts, SAMPLING)
    assert all(r.weight_version == 1 for r in synced)
    assert max_logprob_error(model, synced, TEMPERATURE) < 1e-4

    # A server whose weights changed behind the engine's back (what a restart looks like: it
    # holds its start-up weights) is detected before generating and re-pushed.
    httpx.post(
        f"{url}/collective_rpc",
        json={"method": "reload_weights", "kwargs": {"weights_path": str(tiny_model_dir)}},
        timeout=TIMEOUT_S,
    ).raise_for_status()
    repushed = engine.generate(prompts, SAMPLING)
    assert engine.repushes == 1
    assert max_logprob_error(model, repushed, TEMPERATURE) < 1e-4
    engine.close()


def test_grpo_trains_through_the_server(server, tiny_model_dir, tmp_path):
    """The trainer with rollout.engine=server: synced weights (no mismatch), then async k=1."""
    from posttrain.trainer import Trainer

    url, _ = server

    def cfg(name: str, *extra: str):
        return tiny_cfg(
            tmp_path / name,
            tiny_model_dir,
            "train.steps=3",
            "rollout.engine=server",
            f"rollout.server_url={url}",
            f"rollout.server_timeout_s={TIMEOUT_S}",
            "rollout.prompts_per_step=2",
            "data.train_size=32",
            *extra,
        )

    history = Trainer(cfg("sync")).train()
    assert [m["weight_version"] for m in history] == [1.0, 2.0, 3.0]
    for m in history:  # sampled with exactly the trainer's weights
        assert m["tis/mismatch_abs_mean"] < 1e-4

    history = Trainer(cfg("async", "rollout.max_staleness=1")).train()
    assert [m["rollout/staleness/max"] for m in history] == [0.0, 1.0, 1.0]
    assert history[0]["tis/mismatch_abs_mean"] < 1e-4
    assert history[1]["tis/mismatch_abs_mean"] > 1e-4  # stale samples: TIS sees the gap


def test_stuck_server_times_out_with_a_clear_error():
    """A server that accepts connections but never answers: an error after the timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(RolloutServerError, match=r"within rollout\.server_timeout_s=1s") as err:
            ServerEngine(url, weights_dir="/nonexistent", timeout_s=1.0)
        assert time.monotonic() - start < 10
        assert url in str(err.value)


def test_killed_server_raises_clear_error(server, tiny_model_dir, tmp_path):
    """Must stay last: it kills the module's server (mid-run: a resumable checkpoint is left)."""
    from posttrain.errors import RolloutError
    from posttrain.trainer import Trainer

    url, proc = server
    out = tmp_path / "run"
    trainer = Trainer(
        tiny_cfg(
            out,
            tiny_model_dir,
            "train.steps=4",
            "rollout.engine=server",
            f"rollout.server_url={url}",
            f"rollout.server_timeout_s={TIMEOUT_S}",
            "rollout.prompts_per_step=2",
        )
    )
    trainer.train_step()
    trainer.train_step()
    engine = _engine(url, tiny_model_dir, tmp_path / "weights")
    engine.generate(_prompts(tiny_model_dir), SAMPLING)
    stop(proc)
    with pytest.raises(RolloutError, match="resumable checkpoint") as err:
        trainer.train()
    ckpt = out / "checkpoints" / "interrupted-step-000002"
    assert str(ckpt) in str(err.value) and url in str(err.value)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    assert (ckpt / "model.safetensors").is_file()
    assert not (out / "checkpoints" / "final").exists()
    start = time.monotonic()
    with pytest.raises(RolloutServerError, match="server down or restarting") as err:
        engine.generate(_prompts(tiny_model_dir), SAMPLING)
    assert url in str(err.value)
    model = load_policy(str(tiny_model_dir), dtype="float32")
    with pytest.raises(RolloutServerError, match=re.escape(url)):
        engine.load_weights(model.state_dict().items(), 1)
    assert time.monotonic() - start < TIMEOUT_S
