"""`ServerEngine` against fake vLLM servers (httpx.MockTransport): requests, versions, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from posttrain.rollout.engine import SamplingConfig
from posttrain.rollout.vllm_server import (
    RolloutServerError,
    ServerEngine,
    checkpoint_tensors,
    server_command,
)


class FakeServers:
    """Servers keyed by host: weights = the last reloaded path; a restart resets them."""

    def __init__(self, hosts: list[str]) -> None:
        self.weights = {h: "start" for h in hosts}
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.fail: dict[str, int] = {}  # host -> HTTP status to answer
        self.world_size = {h: 1 for h in hosts}  # inference workers per server (NCCL)

    def handler(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        body = json.loads(request.content) if request.content else {}
        self.requests.append((host, path, body))
        if host in self.fail:
            return httpx.Response(self.fail[host], text="boom")
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": f"model-{host}"}]})
        if path == "/reset_prefix_cache":
            return httpx.Response(200)
        if path == "/collective_rpc" and body["method"] == "reload_weights":
            self.weights[host] = body["kwargs"]["weights_path"]
            return httpx.Response(200)
        if path == "/collective_rpc" and body["method"] == "compute_weight_checksums":
            return httpx.Response(200, json={"results": [{"w": self.weights[host]}]})
        if path == "/get_world_size":
            return httpx.Response(200, json={"world_size": self.world_size[host]})
        if path in ("/start_weight_update", "/update_weights", "/finish_weight_update"):
            if path == "/finish_weight_update":  # what an NCCL update would have loaded
                self.weights[host] = f"nccl-{sum(p == path for _, p, _ in self.requests)}"
            return httpx.Response(200, json={"message": "ok"})
        if path == "/v1/completions":
            n, prompt = body["n"], body["prompt"]
            choices = [
                {
                    "index": j,
                    "text": "t",
                    "token_ids": [prompt[0], 7],
                    "logprobs": {"token_logprobs": [-0.5, -1.0]},
                    "finish_reason": "stop" if j == 0 else "length",
                }
                for j in reversed(range(n))  # out of order: the engine sorts by index
            ]
            return httpx.Response(200, json={"choices": choices})
        return httpx.Response(404)


def _engine(tmp_path: Path, servers: FakeServers) -> ServerEngine:
    return ServerEngine(
        "http://a:1, http://b:2",
        weights_dir=tmp_path / "w",
        timeout_s=5,
        transport=httpx.MockTransport(servers.handler),
    )


def test_generate_round_robin_with_per_prompt_seeds(tmp_path):
    servers = FakeServers(["a", "b"])
    engine = _engine(tmp_path, servers)
    rollouts = engine.generate([[1], [2], [3]], SamplingConfig(n=2, seed=10, max_new_tokens=4))
    calls = [(h, b) for h, p, b in servers.requests if p == "/v1/completions"]
    assert [(h, b["prompt"], b["seed"], b["model"]) for h, b in calls] == [
        ("a", [1], 10, "model-a"),
        ("b", [2], 12, "model-b"),
        ("a", [3], 14, "model-a"),
    ]
    assert all(b["logprobs"] == 0 and b["return_token_ids"] for _, b in calls)
    assert [r.prompt_index for r in rollouts] == [0, 0, 1, 1, 2, 2]
    assert [r.finish_reason for r in rollouts[:2]] == ["stop", "length"]
    assert rollouts[2].completion_ids == [2, 7] and rollouts[2].logprobs == [-0.5, -1.0]
    assert all(r.weight_version == 0 for r in rollouts)


def test_versioned_push_and_restart_repush(tmp_path):
    servers = FakeServers(["a", "b"])
    engine = _engine(tmp_path, servers)
    tensors = {"w": torch.ones(2), "tied": None}
    tensors["tied"] = tensors["w"]  # shared storage is written as two tensors
    engine.load_weights(tensors.items(), 3)
    path = str((tmp_path / "w" / "v3").resolve())
    assert servers.weights == {"a": path, "b": path} and engine.weight_version == 3
    assert (tmp_path / "w" / "v3" / "model.safetensors").is_file()
    engine.load_weights([("w", torch.zeros(2))], 4)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["v4"]  # older file removed

    servers.weights["b"] = "start"  # b restarted with its start-up weights
    rollouts = engine.generate([[1], [2]], SamplingConfig(n=1))
    assert engine.repushes == 1 and servers.weights["b"].endswith("v4")
    assert all(r.weight_version == 4 for r in rollouts)

    servers.weights["a"] = "start"
    (tmp_path / "w" / "v4" / "model.safetensors").unlink()
    (tmp_path / "w" / "v4").rmdir()  # nothing left to re-push
    with pytest.raises(RolloutServerError, match=r"http://a:1: its weights changed"):
        engine.generate([[1]], SamplingConfig(n=1))


def test_http_errors_name_the_server(tmp_path):
    servers = FakeServers(["a", "b"])
    engine = _engine(tmp_path, servers)
    servers.fail["b"] = 500
    with pytest.raises(RolloutServerError, match=r"http://b:2: POST /collective_rpc .*HTTP 500"):
        engine.generate([[1], [2]], SamplingConfig(n=1))


def test_checkpoint_tensors_spell_out_a_tied_head(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.ones(3, 2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    names = [n for n, _ in checkpoint_tensors(tmp_path)]
    assert names == ["model.embed_tokens.weight", "lm_head.weight"]


def test_server_command_turns_on_dev_mode_and_processed_logprobs():
    cmd, env = server_command("m", port=1234, host="0.0.0.0", max_model_len=64, extra=["--x"])
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    assert "--logprobs-mode processed_logprobs" in joined
    assert "--port 1234 --host 0.0.0.0" in joined and "--max-model-len 64" in joined
    assert cmd[-1] == "--x"


def test_generate_first_index_shifts_seeds_servers_and_prompt_indices(tmp_path):
    """A rank's block [2, 4) of a batch gets the seeds/servers/indices of the whole batch."""
    servers = FakeServers(["a", "b"])
    engine = _engine(tmp_path, servers)
    rollouts = engine.generate([[3], [4]], SamplingConfig(n=2, seed=10), first_index=2)
    calls = [(h, b["prompt"], b["seed"]) for h, p, b in servers.requests if p == "/v1/completions"]
    assert calls == [("a", [3], 10 + 2 * 2), ("b", [4], 10 + 3 * 2)]
    assert [r.prompt_index for r in rollouts] == [2, 2, 3, 3]
    assert [r.prompt_ids for r in rollouts] == [[3], [3], [4], [4]]


def test_server_command_enables_nccl_weight_transfer_only_when_asked():
    cmd, _ = server_command("m", weight_transfer="nccl")
    i = cmd.index("--weight-transfer-config")
    assert json.loads(cmd[i + 1]) == {"backend": "nccl"}
    assert "--weight-transfer-config" not in server_command("m")[0]
    with pytest.raises(ValueError, match="weight_transfer='gloo'"):
        server_command("m", weight_transfer="gloo")


def test_nccl_mode_cannot_repush_a_restarted_server(tmp_path):
    servers = FakeServers(["a"])
    engine = ServerEngine(
        "http://a:1",
        weights_dir=tmp_path,
        weight_transfer="nccl",
        transport=httpx.MockTransport(servers.handler),
    )
    servers.weights["a"] = "other"
    with pytest.raises(RolloutServerError, match="NCCL weight transfer keeps no copy"):
        engine.generate([[1]], SamplingConfig(n=1))
