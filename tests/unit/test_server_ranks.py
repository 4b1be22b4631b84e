"""`RankedServerEngine` in two real gloo processes against fake vLLM servers (httpx.MockTransport).

Each process has its own fake servers (so what each rank sent is visible): sharded generation
equals one engine's, only rank 0 pushes, and a failure on either rank ends both with the error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import torch
import torch.multiprocessing as mp

from posttrain.rollout.engine import SamplingConfig
from posttrain.rollout.vllm_server import RolloutServerError, ServerEngine
from tests.unit.test_server_engine import FakeServers

pytestmark = pytest.mark.slow  # starts two processes

URLS = "http://a:1, http://b:2"
PROMPTS = [[1], [2], [3], [4], [5]]
SAMPLING = SamplingConfig(n=2, seed=10, max_new_tokens=4)


def _counted(n: int, seen: list[str]):
    for i in range(n):
        seen.append(f"w{i}")
        yield f"w{i}", torch.full((2,), float(i))


def _expect_error(fn, out: dict, key: str) -> None:
    try:
        fn()
        out[key] = None
    except RolloutServerError as err:
        out[key] = str(err)


def _rank(rank: int, world: int, root: str) -> None:
    """One training rank: generate, push, then failures on rank 1 (generate) and 0 (push)."""
    from posttrain.rollout.server_ranks import make_server_engine

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world
    )
    servers = FakeServers(["a", "b"])
    engine = make_server_engine(
        URLS,
        model_path=f"{root}/no-such-dir",
        rank=rank,
        world=world,
        weights_dir=f"{root}/weights-{rank}",
        timeout_s=5,
        transport=httpx.MockTransport(servers.handler),
    )
    out: dict = {}
    rollouts = engine.generate(PROMPTS, SAMPLING)
    out["rollouts"] = [(r.prompt_index, r.prompt_ids, r.completion_ids) for r in rollouts]
    out["sent"] = [
        (h, b["prompt"], b["seed"]) for h, p, b in servers.requests if p == "/v1/completions"
    ]
    seen: list[str] = []
    engine.load_weights(_counted(5, seen), 3)
    out["push"] = {
        "read": len(seen),
        "version": engine.weight_version,
        "reloads": sum("reload_weights" in json.dumps(b) for _, _, b in servers.requests),
    }
    if rank == 1:
        servers.fail["a"] = 503  # only rank 1's requests to server a fail
    _expect_error(lambda: engine.generate(PROMPTS, SAMPLING), out, "generate_error")
    servers.fail.clear()
    if rank == 0:
        servers.fail["b"] = 500  # rank 0's reload of server b fails
    seen.clear()
    _expect_error(lambda: engine.load_weights(_counted(5, seen), 4), out, "push_error")
    out["push_error_read"] = len(seen)
    out["version_after_error"] = engine.weight_version
    Path(root, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def test_two_ranks_share_the_batch_and_only_rank0_pushes(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))

    servers = FakeServers(["a", "b"])
    one = ServerEngine(
        URLS, weights_dir=tmp_path / "one", transport=httpx.MockTransport(servers.handler)
    )
    expected = [
        [r.prompt_index, r.prompt_ids, r.completion_ids] for r in one.generate(PROMPTS, SAMPLING)
    ]
    assert r0["rollouts"] == expected  # as one engine given every prompt
    assert r1["rollouts"] == r0["rollouts"]
    # Blocks [0, 3) and [3, 5): the seeds and servers of the unsharded batch.
    assert r0["sent"] == [["a", [1], 10], ["b", [2], 12], ["a", [3], 14]]
    assert r1["sent"] == [["b", [4], 16], ["a", [5], 18]]

    assert r0["push"] == {"read": 5, "version": 3, "reloads": 2}  # servers a and b
    assert r1["push"] == {"read": 5, "version": 3, "reloads": 0}  # read the stream, sent nothing
    assert not (tmp_path / "weights-1").exists()

    for r in (r0, r1):  # rank 1's failure stops rank 0 too, with the same message
        assert "rank 1: rollout server http://a:1" in r["generate_error"]
        assert "HTTP 503" in r["generate_error"]
        assert "rank 0: rollout server http://b:2" in r["push_error"]
        assert r["push_error_read"] == 5  # rank 0 drained the stream after its failure
        assert r["version_after_error"] == 3
