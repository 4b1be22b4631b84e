"""NCCL weight push into vLLM rollout servers (`rollout.server_weight_transfer: nccl`, CUDA).

Built on vLLM's public weight-transfer pieces (vllm/distributed/weight_transfer/): the trainer
side `NCCLTrainerWeightTransferEngine` (one per server; it opens the trainer's end of an NCCL
group `[trainer rank 0, the server's workers...]`, packs and broadcasts tensors) driven through
`HTTPVLLMWeightSyncClient` (the server's `/init_weight_transfer_engine`, `/start_weight_update`,
`/update_weights`, `/finish_weight_update` routes, on with `VLLM_SERVER_DEV_MODE=1`). The server
must run with `--weight-transfer-config '{"backend": "nccl"}'` (`server_command(...,
weight_transfer="nccl")` adds it). This module imports vllm: import it only for the NCCL path.

Our weights arrive as a one-shot `(name, tensor)` stream
(`posttrain.runtime.weight_sync.stream_weights`: ZeRO-3 parameters gathered a bucket at a time),
while vLLM's engine wants a re-iterable `WeightSource` whose `metadata()` (name, dtype, full shape,
in order) is known before the first byte is sent. So one update is cut into chunks of at most
`chunk_bytes`: each chunk becomes a `TensorListSource` (metadata read off the chunk's own tensors,
so the two channels agree by construction) and is sent with `send_weights` between one
`start_weight_update` and one `finish_weight_update` of every server (vLLM's layerwise reload
gathers a layer's weights across `update_weights` calls). The stream is read once; each chunk goes
to every server; at most one chunk (plus the stream's own bucket) is alive on the trainer.

Only the sender (training rank 0) uses this module; other ranks drain their copy of the stream so
that the ZeRO-3 gathers stay collective (`posttrain.rollout.server_ranks`).

Untested on GPU: this machine has no CUDA, so the NCCL rendezvous and broadcast have never run
here. CPU tests cover the WeightSource adapter (order, dtypes, shapes against a real model), the
chunking, the init info, the server flag and the HTTP call sequence (vLLM's trainer engine with a
recording stand-in for the NCCL communicator).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerInitInfo,
    NCCLTrainerWeightTransferEngine,
)

from posttrain.rollout.engine import RolloutServerError

# 1 GiB: vLLM's packed broadcast splits it further into its own buffers (2 x 1 GiB default).
DEFAULT_CHUNK_BYTES = 1 << 30


def local_address_towards(url: str) -> str:
    """This host's IP address on the route to `url`'s host (no packet is sent).

    Args:
        url: a server URL such as `http://10.0.0.5:8000`.

    Returns:
        The address the server can use to reach this process (e.g. `127.0.0.1` for a
        server on the loopback interface).
    """
    host = urlsplit(url).hostname or "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(host), 9))  # UDP connect only picks a route
            return str(s.getsockname()[0])
    except OSError as err:
        raise RolloutServerError(
            f"rollout server {url}: cannot find this host's address towards it ({err}); set "
            "rollout.server_nccl_address to an address of training rank 0 the server can reach"
        ) from None


def free_port() -> int:
    """A TCP port that nothing on this host listens on right now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def chunked(
    named_tensors: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive runs of the stream holding at most `chunk_bytes` (a larger tensor: alone).

    Args:
        named_tensors: (name, tensor) pairs, read once, in order.
        chunk_bytes: bound on the bytes of one chunk.

    Yields:
        Non-empty lists of (name, tensor); concatenated they are the stream.
    """
    chunk: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > chunk_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += nbytes
    if chunk:
        yield chunk


class TensorListSource(WeightSource):
    """Re-iterable vLLM `WeightSource` over a list of (name, tensor) in HF naming.

    Args:
        pairs: the tensors of one chunk, full (already gathered), on any device.
        device: where iteration puts them (the NCCL device); None leaves them where they are.

    `metadata()` is `(name, tensor.dtype, tuple(tensor.shape))` per pair, in list order;
    iteration yields the same names in the same order, each tensor contiguous on `device` with
    its dtype and shape unchanged, so vLLM's check of the two channels always passes.
    """

    def __init__(
        self, pairs: list[tuple[str, torch.Tensor]], device: torch.device | str | None = None
    ) -> None:
        self.pairs = list(pairs)
        self.device = device

    def metadata(self) -> list[ParamMeta]:
        """(name, dtype, full shape) of every tensor, in iteration order; transfers nothing."""
        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.pairs]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """A fresh pass: (name, contiguous tensor on `device`)."""
        for name, tensor in self.pairs:
            t = tensor.detach()
            if self.device is not None:
                t = t.to(self.device)
            yield name, t.contiguous()


def make_sync_client(url: str, call: Callable[[str, str, Any], Any], timeout_s: float) -> Any:
    """vLLM's `HTTPVLLMWeightSyncClient` for `url`, its requests sent through `call`.

    Args:
        url: server base URL.
        call: `(url, path, json body) -> parsed reply`, raising `RolloutServerError` (the
            ServerEngine's timed HTTP call, so failures name the server and the route).
        timeout_s: kept on the client (vLLM's default transport reads it).
    """

    class _Client(HTTPVLLMWeightSyncClient):
        def _post(self, path: str, json: dict[str, Any] | None = None) -> None:
            call(self.base_url, "/" + path, json)

    return _Client(url, timeout=timeout_s)


class _OneUpdate:
    """The client seen by the trainer engine while one update is sent in chunks.

    `send_weights` calls start/update/finish per chunk; start and finish are issued once per
    update by `NCCLServerPush.push` instead, so here they do nothing.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.client.init_weight_transfer_engine(init_info)

    def start_weight_update(self) -> None:
        """Issued once per update by `NCCLServerPush.push`."""

    def update_weights(self, update_info: Any) -> None:
        self.client.update_weights(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        """Issued once per update by `NCCLServerPush.push`."""


def trainer_init_info(address: str, port: int, server_world_size: int) -> Any:
    """`NCCLTrainerInitInfo` of the sender (rank 0) for one server.

    Args:
        address, port: the rendezvous (a TCP store opened by this process).
        server_world_size: the server's inference workers (`GET /get_world_size`: TP*PP*DP).

    Returns:
        Init info with `world_size = 1 + server_world_size` (the trainer is NCCL rank 0, the
        workers follow) and vLLM's packed-broadcast defaults.
    """
    return NCCLTrainerInitInfo(
        master_address=address,
        master_port=int(port),
        world_size=1 + int(server_world_size),
        rank=0,
    )


class NCCLServerPush:
    """NCCL weight push from this process (training rank 0) into every server.

    Args:
        urls: server base URLs.
        call: `(method, url, path, body) -> reply` raising `RolloutServerError`.
        address: rendezvous address the servers can reach ("" = `local_address_towards`).
        port: rendezvous port of server 0 (server i: port + i; 0 = a free port each).
        timeout_s: HTTP timeout kept on the clients.
        chunk_bytes: bytes per `update_weights` round.
        device: the CUDA device the tensors are broadcast from (None: current device).
    """

    def __init__(
        self,
        urls: list[str],
        call: Callable[[str, str, str, Any], Any],
        *,
        address: str = "",
        port: int = 0,
        timeout_s: float = 120.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        device: torch.device | str | None = None,
    ) -> None:
        self.urls = list(urls)
        self.call = call
        self.address = address  # "" = found at init (`local_address_towards`)
        self.ports = [port + i if port else 0 for i in range(len(self.urls))]
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.device = device
        self.clients = [
            make_sync_client(u, lambda u_, p, b: call("POST", u_, p, b), timeout_s)
            for u in self.urls
        ]
        self.engines: list[Any] = []

    def init_infos(self) -> list[Any]:
        """One `NCCLTrainerInitInfo` per server (asks each for its worker count)."""
        address = self.address or local_address_towards(self.urls[0])
        infos = []
        for url, port in zip(self.urls, self.ports, strict=True):
            world = self.call("GET", url, "/get_world_size", None)["world_size"]
            infos.append(trainer_init_info(address, port or free_port(), world))
        return infos

    def init(self) -> None:
        """Rendezvous with every server once (each server's init blocks until it joins)."""
        for info, client in zip(self.init_infos(), self.clients, strict=True):
            self.engines.append(
                NCCLTrainerWeightTransferEngine.trainer_init(
                    info, client=_OneUpdate(client), source=TensorListSource([])
                )
            )

    def push(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None
    ) -> int:
        """Send one full weight update to every server.

        Args:
            named_tensors: the full weights, (name, tensor) in HF naming, read once.
            version: reported to the servers with the finish (their `GET /weight_info`).

        Returns:
            The number of chunks sent.
        """
        if not self.engines:
            self.init()
        for client in self.clients:
            client.start_weight_update()
        chunks = 0
        for chunk in chunked(named_tensors, self.chunk_bytes):
            source = TensorListSource(chunk, self.device or _cuda_device())
            for engine in self.engines:
                engine.source = source
                engine.send_weights()
            chunks += 1
        for client in self.clients:
            client.finish_weight_update(None if version is None else str(version))
        return chunks

    def shutdown(self) -> None:
        """Tear down the trainer ends of the NCCL groups."""
        for engine in self.engines:
            engine.shutdown()
        self.engines = []


def _cuda_device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
