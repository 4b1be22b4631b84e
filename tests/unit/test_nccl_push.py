"""NCCL weight push (`rollout.server_weight_transfer: nccl`): every part that runs without CUDA.

The NCCL rendezvous and broadcast themselves need GPUs and are NOT tested here. Covered: the
WeightSource adapter against a real tiny model's weights (order, dtypes, shapes, values, checked
with vLLM's own sender-side check), the chunking, the init info, the config error, and the HTTP
sequence of an update driven by vLLM's real `NCCLTrainerWeightTransferEngine` whose NCCL
communicator is replaced by a recorder (the one stand-in: no NCCL on this machine).
"""

from __future__ import annotations

import importlib.util

import httpx
import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.models import load_policy
from posttrain.rollout.engine import SamplingConfig
from posttrain.rollout.vllm_server import ServerEngine
from posttrain.runtime.weight_sync import stream_weights
from tests.unit.test_server_engine import FakeServers

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not installed"
)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny model, with one module in float16 so the stream mixes dtypes."""
    m = load_policy(str(tiny_model_dir), dtype="float32")
    m.model.norm.to(torch.float16)
    return m


def _stream(model: torch.nn.Module):
    return stream_weights(model, bucket_numel=4096)


def test_chunks_become_sources_that_agree_with_the_model(model):
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from posttrain.rollout.nccl_push import TensorListSource, chunked

    chunk_bytes = 64 * 1024
    chunks = list(chunked(_stream(model), chunk_bytes))
    assert len(chunks) > 3
    names = []
    for chunk in chunks:
        nbytes = [t.numel() * t.element_size() for _, t in chunk]
        assert sum(nbytes) <= chunk_bytes or len(chunk) == 1  # a larger tensor goes alone
        source = TensorListSource(chunk, device="cpu")
        meta = source.metadata()
        # vLLM's sender checks every yielded tensor against the metadata sent to the workers.
        sent = list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))
        assert [n for n, _ in sent] == [m.name for m in meta] == [n for n, _ in chunk]
        assert [n for n, _ in source] == [m.name for m in meta]  # re-iterable
        names += [m.name for m in meta]
        for m, (_, t) in zip(meta, sent, strict=True):
            assert t.is_contiguous() and t.dtype == m.dtype and tuple(t.shape) == m.shape

    state = model.state_dict()
    assert sorted(names) == sorted(state) and len(names) == len(state)  # tied head included
    assert names == [n for n, _ in _stream(model)]  # one pass of the stream, in its order
    got = {n: t for chunk in chunks for n, t in chunk}
    for name, expected in state.items():
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape
        assert torch.equal(got[name], expected)
    assert got["model.norm.weight"].dtype == torch.float16


def test_init_info_per_server(tmp_path):
    from posttrain.rollout.nccl_push import NCCLServerPush, local_address_towards

    servers = FakeServers(["a", "b"])
    servers.world_size["b"] = 4  # e.g. tensor parallel 4
    engine = ServerEngine(
        "http://a:1,http://b:2",
        weights_dir=tmp_path,
        transport=httpx.MockTransport(servers.handler),
    )
    push = NCCLServerPush(engine.urls, engine._call, address="10.1.2.3", port=29600)
    infos = push.init_infos()
    assert [(i.master_address, i.master_port, i.world_size) for i in infos] == [
        ("10.1.2.3", 29600, 2),
        ("10.1.2.3", 29601, 5),
    ]
    assert all(i.rank == 0 and i.is_sender and i.backend == "nccl" for i in infos)
    assert local_address_towards("http://127.0.0.1:8000") == "127.0.0.1"
    local = FakeServers(["127.0.0.1"])
    engine = ServerEngine(
        "http://127.0.0.1:1", weights_dir=tmp_path, transport=httpx.MockTransport(local.handler)
    )
    (auto,) = NCCLServerPush(engine.urls, engine._call).init_infos()
    assert auto.master_address == "127.0.0.1"  # "": the address that routes to the server
    assert 0 < auto.master_port < 65536 and auto.world_size == 2  # port 0: a free port


class RecordingGroup:
    """Stands in for vLLM's PyNcclCommunicator (no NCCL here): records what is broadcast."""

    def __init__(self) -> None:
        self.sent: list[torch.Tensor] = []

    def broadcast(self, tensor: torch.Tensor, src: int, stream: object = None) -> None:
        assert src == 0
        self.sent.append(tensor.clone())

    def destroy(self) -> None:
        pass


def test_nccl_update_sequence_through_vllm_trainer_engine(model, tmp_path, monkeypatch):
    """`ServerEngine.load_weights` in NCCL mode: one start, chunked updates, one finish."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from posttrain.rollout import nccl_push

    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: None)  # no CUDA here
    servers = FakeServers(["a", "b"])
    engine = ServerEngine(
        "http://a:1,http://b:2",
        weights_dir=tmp_path,
        weight_transfer="nccl",
        transport=httpx.MockTransport(servers.handler),
    )
    push = nccl_push.NCCLServerPush(engine.urls, engine._call, chunk_bytes=64 * 1024)
    groups = [RecordingGroup() for _ in engine.urls]
    for client, group in zip(push.clients, groups, strict=True):
        trainer = NCCLTrainerWeightTransferEngine(
            client=nccl_push._OneUpdate(client),
            source=nccl_push.TensorListSource([]),
            is_sender=True,
            packed=False,  # the packed path needs CUDA streams
        )
        trainer.model_update_group = group
        push.engines.append(trainer)
    engine._nccl = push  # what the first push would open with NCCL

    engine.load_weights(_stream(model), 7)
    assert engine.weight_version == 7 and not list(tmp_path.iterdir())  # no weight file
    state = model.state_dict()
    for host, group in zip("ab", groups, strict=True):
        calls = [(p, b) for h, p, b in servers.requests if h == host and "weight" in p]
        paths = [p for p, _ in calls]
        assert paths[0] == "/start_weight_update" and paths[-1] == "/finish_weight_update"
        assert calls[-1][1] == {"weight_version": "7"}  # the server's /weight_info reports it
        updates = [b["update_info"] for p, b in calls if p == "/update_weights"]
        assert len(updates) == len(paths) - 2 > 3  # one per chunk, between start and finish
        names = [n for u in updates for n in u["names"]]
        assert names == [n for n, _ in _stream(model)]
        shapes = [s for u in updates for s in u["shapes"]]
        dtypes = [d for u in updates for d in u["dtype_names"]]
        assert shapes == [list(state[n].shape) for n in names]
        assert dtypes == [str(state[n].dtype).removeprefix("torch.") for n in names]
        assert len(group.sent) == len(names)
        assert all(torch.equal(t, state[n]) for n, t in zip(names, group.sent, strict=True))
        reset = [p for h, p, _ in servers.requests if h == host and p == "/reset_prefix_cache"]
        assert reset  # the KV cache of the old weights is dropped
    # The new fingerprints were recorded: the check before generating passes.
    engine.generate([[1]], SamplingConfig(n=1))
    assert engine.repushes == 0


def test_nccl_transfer_needs_cuda():
    from posttrain.config import load_config

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: nccl is a valid choice here")
    with pytest.raises(ConfigError, match=r"rollout\.server_weight_transfer=nccl needs CUDA"):
        load_config(
            None,
            [
                "rollout.engine=server",
                "rollout.server_url=http://127.0.0.1:8000",
                "rollout.server_weight_transfer=nccl",
            ],
        )
    with pytest.raises(ConfigError, match=r"rollout\.server_weight_transfer"):
        load_config(None, ["rollout.server_weight_transfer=ipc"])


@pytest.mark.slow  # builds a DeepSpeed engine
def test_sources_over_a_zero3_gathered_merged_lora_stream(tiny_model_dir):
    """ZeRO-3 (one gloo process) + LoRA: the chunk sources carry the gathered, merged weights."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from posttrain.config import LoRAConfig
    from posttrain.rollout.nccl_push import TensorListSource, chunked
    from posttrain.runtime.checkpoint import full_state_dict
    from tests.integration.test_weight_sync import _randomise_adapters, _zero3_engine

    model = load_policy(str(tiny_model_dir), lora=LoRAConfig(r=4, alpha=8.0))
    _randomise_adapters(model)
    expected = full_state_dict(model)  # merged, before DeepSpeed partitions anything
    engine = _zero3_engine(model, offload=False)
    assert all(p.numel() == 0 for p in engine.module.parameters())  # partitioned
    got: dict[str, torch.Tensor] = {}
    for chunk in chunked(stream_weights(engine, bucket_numel=50_000), 256 * 1024):
        source = TensorListSource(chunk)
        meta = source.metadata()
        for (name, tensor), m in zip(
            NCCLTrainerWeightTransferEngine._checked_iter(source, meta), meta, strict=True
        ):
            assert tuple(tensor.shape) == m.shape == tuple(expected[name].shape)
            got[name] = tensor
    assert set(got) == set(expected) and not any(".lora_" in n for n in got)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
