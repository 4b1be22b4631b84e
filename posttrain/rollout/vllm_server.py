"""Rollouts from separate vLLM OpenAI-compatible server process(es), with versioned weight pushes.

Start a server with `posttrain rollout-server MODEL --port 8000` (see `server_command`), then
train with `rollout.engine: server` and `rollout.server_url: http://HOST:8000` (several servers:
comma-separated URLs; prompts are spread over them round-robin, weights go to all).

Generation: one `POST /v1/completions` per prompt with the prompt's token ids, `n` samples,
`seed = seed + i * n` (as the in-process engine), `logprobs: 0` and `return_token_ids: true`, so
each Rollout carries the exact sampled token ids and the sampler's logprob of each of them. The
server must run with `--logprobs-mode processed_logprobs` (the launcher sets it) so the logprobs
are those of log_softmax(logits / temperature), the definition the trainer uses.

Weight sync (CPU path, and any host that shares a filesystem with the server): the trainer's
weights are written as `<weights_dir>/v<version>/model.safetensors`, then every server is asked
to `POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": <dir>}}` (a dev
endpoint: the server runs with `VLLM_SERVER_DEV_MODE=1`) and `POST /reset_prefix_cache` (its KV
cache was computed with the old weights). The latest file is kept so a restarted server can be
re-pushed.

Weight sync over NCCL (`weight_transfer="nccl"`, `rollout.server_weight_transfer: nccl`, CUDA
trainer and servers started with `server_command(..., weight_transfer="nccl")`): no file; the
first push opens an NCCL group with every server and each push broadcasts the weights from this
process through vLLM's trainer-side NCCL engine (`posttrain.rollout.nccl_push`). UNTESTED ON GPU:
written and unit-tested on a CPU-only machine; the rendezvous and the broadcast never ran. A
server that lost its weights (restart) cannot be re-pushed in this mode (nothing is kept and its
NCCL group is gone): the check raises and the run stops with a resumable checkpoint.

Several training ranks: `posttrain.rollout.server_ranks.RankedServerEngine` wraps one
`ServerEngine` per rank (each rank samples its block of prompts; rank 0 alone pushes weights).

Versions: after every push the engine asks each server for `compute_weight_checksums` (a
collective_rpc of vLLM's worker: a sha256 per parameter) and records their digest as the
fingerprint of that version. Before each `generate` (with `verify_weights=True`) the fingerprint
is checked again: a server that restarted (it holds its start-up weights) or was changed by
someone else no longer matches; it is re-pushed from the kept file and checked again, or a
`RolloutServerError` is raised. The check hashes the server's weights (about 1 GB/s): turn it off
for large models and rely on the per-request timeout and connection errors.

Every HTTP call runs under `timeout_s`; a dead, restarting or stuck server gives a
`RolloutServerError` naming the URL and what failed, never a hang.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from posttrain.rollout.engine import Rollout, RolloutServerError, SamplingConfig, check_sampling

WEIGHT_TRANSFERS = ("file", "nccl")
# Routes a server only has with VLLM_SERVER_DEV_MODE=1 (weight reload, NCCL weight transfer).
_DEV_ROUTES = (
    "/collective_rpc",
    "/reset_prefix_cache",
    "/get_world_size",
    "/init_weight_transfer_engine",
    "/start_weight_update",
    "/update_weights",
    "/finish_weight_update",
)


def parse_urls(server_url: str | list[str]) -> list[str]:
    """`"http://a:8000, http://b:8000"` (or a list) -> ["http://a:8000", "http://b:8000"]."""
    parts = server_url.split(",") if isinstance(server_url, str) else list(server_url)
    return [p.strip().rstrip("/") for p in parts if p.strip()]


def server_command(
    model: str,
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    max_model_len: int | None = None,
    weight_transfer: str = "file",
    extra: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of a rollout server (`posttrain rollout-server`).

    Args:
        model: model directory or hub name (the trainer's starting weights).
        port, host: where the OpenAI-compatible API listens.
        max_model_len: prompt + completion token budget (None: the model's own).
        weight_transfer: "file" (reload from a safetensors file) or "nccl" (also enables vLLM's
            NCCL weight-transfer backend: `--weight-transfer-config '{"backend": "nccl"}'`).
        extra: further `vllm.entrypoints.openai.api_server` arguments, appended.

    Returns:
        (argv, env additions): `VLLM_SERVER_DEV_MODE=1` enables `/collective_rpc` (weight reload)
        and `/reset_prefix_cache`; `--logprobs-mode processed_logprobs` makes the returned
        logprobs those after temperature; on CPU the dtype is float32 and eager mode is used.
    """
    import sys

    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--port", str(port), "--host", host,
        "--logprobs-mode", "processed_logprobs",
    ]  # fmt: skip
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    if not torch.cuda.is_available():
        cmd += ["--dtype", "float32", "--enforce-eager"]
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if weight_transfer not in WEIGHT_TRANSFERS:
        raise ValueError(f"weight_transfer={weight_transfer!r}: one of {WEIGHT_TRANSFERS}")
    if weight_transfer == "nccl":
        cmd += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    return cmd + list(extra or []), env


def _unique_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """{name: contiguous CPU tensor}; tensors sharing storage (tied weights) are cloned apart."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in named_tensors:
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def checkpoint_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every `*.safetensors` file in an HF model directory.

    With `tie_word_embeddings` and no `lm_head.weight` in the files, the embedding is also
    yielded as `lm_head.weight`.
    """
    from safetensors import safe_open

    root = Path(path)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise RolloutServerError(f"{root}: no *.safetensors weight files to push")
    config_file = root / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    embed_file = None
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                names.add(name)
                if name == "model.embed_tokens.weight":
                    embed_file = file
                yield name, fh.get_tensor(name)
    if config.get("tie_word_embeddings") and "lm_head.weight" not in names and embed_file:
        with safe_open(str(embed_file), "pt") as fh:
            yield "lm_head.weight", fh.get_tensor("model.embed_tokens.weight")


class ServerEngine:
    """`RolloutEngine` over one or more vLLM OpenAI-compatible servers.

    Args:
        urls: server base URLs (e.g. `http://127.0.0.1:8000`) or one comma-separated string.
        weights_dir: directory the servers can read, where weight files are written.
        timeout_s: the limit of every HTTP call (a prompt's n samples, a reload, a check).
        tokenizer: decodes completion texts like the other engines (skip special tokens);
            None uses the servers' own detokenised text.
        verify_weights: check every server's weight fingerprint before each `generate`.
        max_concurrency: prompts in flight at once (over all servers).
        transport: an httpx transport (tests: `httpx.MockTransport`); None = the network.
        weight_transfer: "file" (default) or "nccl" (CUDA; see the module docstring).
        nccl_address, nccl_port: NCCL rendezvous of this process as the servers reach it
            ("" = the local address routing to the first server; port of server 0, server i
            uses port + i, 0 = free ports).
    """

    def __init__(
        self,
        urls: str | list[str],
        *,
        weights_dir: str | Path,
        timeout_s: float = 120.0,
        tokenizer: Any = None,
        verify_weights: bool = True,
        max_concurrency: int = 64,
        transport: httpx.BaseTransport | None = None,
        weight_transfer: str = "file",
        nccl_address: str = "",
        nccl_port: int = 0,
    ) -> None:
        self.urls = parse_urls(urls)
        if not self.urls:
            raise RolloutServerError("rollout.server_url: no server URL given")
        self.weights_dir = Path(weights_dir)
        self.timeout_s = float(timeout_s)
        self.tokenizer = tokenizer
        self.verify_weights = verify_weights
        self.max_concurrency = max_concurrency
        self.client = httpx.Client(timeout=httpx.Timeout(self.timeout_s), transport=transport)
        self.weight_version = 0
        self.weights_path: Path | None = None  # the latest pushed file's directory
        self.models = {url: self._model_name(url) for url in self.urls}
        # Only an engine that checks them needs the servers' start-up fingerprints.
        self.fingerprints = {url: self.fingerprint(url) for url in self.urls if verify_weights}
        self.repushes = 0
        if weight_transfer not in WEIGHT_TRANSFERS:
            raise RolloutServerError(
                f"rollout.server_weight_transfer={weight_transfer!r}: one of {WEIGHT_TRANSFERS}"
            )
        self.weight_transfer = weight_transfer
        self.nccl_address = nccl_address
        self.nccl_port = int(nccl_port)
        self._nccl: Any = None  # nccl_push.NCCLServerPush, made on the first NCCL push

    # ------------------------------------------------------------------ http
    def _call(self, method: str, url: str, path: str, body: Any = None) -> Any:
        """One HTTP call under the timeout; returns parsed JSON (or None for an empty body)."""
        try:
            resp = self.client.request(method, url + path, json=body)
        except httpx.TimeoutException:
            raise RolloutServerError(
                f"rollout server {url}: {method} {path} got no answer within "
                f"rollout.server_timeout_s={self.timeout_s:g}s (server stuck or overloaded?)"
            ) from None
        except httpx.HTTPError as err:
            raise RolloutServerError(
                f"rollout server {url}: {method} {path} failed: {type(err).__name__}: {err} "
                "(server down or restarting?)"
            ) from None
        if resp.status_code == 404 and path in _DEV_ROUTES:
            raise RolloutServerError(
                f"rollout server {url}: {path} not found: start the server with "
                "VLLM_SERVER_DEV_MODE=1 (`posttrain rollout-server MODEL` does)"
            )
        if resp.status_code != 200:
            raise RolloutServerError(
                f"rollout server {url}: {method} {path} returned HTTP {resp.status_code}: "
                f"{resp.text[:500]}"
            )
        return resp.json() if resp.content else None

    def _model_name(self, url: str) -> str:
        data = self._call("GET", url, "/v1/models")["data"]
        if not data:
            raise RolloutServerError(f"rollout server {url}: /v1/models lists no model")
        return str(data[0]["id"])

    def fingerprint(self, url: str) -> str:
        """sha256 over the server's per-parameter weight digests (changes with any weight)."""
        out = self._call("POST", url, "/collective_rpc", {"method": "compute_weight_checksums"})
        if out is None or "results" not in out:
            raise RolloutServerError(
                f"rollout server {url}: /collective_rpc compute_weight_checksums gave {out!r}"
            )
        return hashlib.sha256(json.dumps(out["results"], sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------ generation
    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, *, first_index: int = 0
    ) -> list[Rollout]:
        """Sample `sampling.n` completions per prompt on the servers (round-robin by prompt).

        Args:
            prompt_ids: P prompts, each a list of token ids.
            sampling: n, temperature, top_p, max_new_tokens, seed (prompt i: seed + i * n).
            first_index: global index of prompt 0 (a rank's block of a larger batch): prompt i
                is prompt `first_index + i` for its seed, its server and `prompt_index`.

        Returns:
            P * n Rollouts, prompt-major, stamped with the version the servers hold.

        Raises:
            RolloutServerError: a server failed, timed out, or holds unknown weights.
        """
        check_sampling(sampling)
        if self.verify_weights:
            self.check_versions()
        version = self.weight_version
        workers = max(1, min(self.max_concurrency, len(prompt_ids)))
        indices = range(first_index, first_index + len(prompt_ids))
        with ThreadPoolExecutor(workers, thread_name_prefix="rollout-server") as pool:
            futures = [
                pool.submit(self._request, i, ids, sampling)
                for i, ids in zip(indices, prompt_ids, strict=True)
            ]
            choices = [f.result() for f in futures]
        rollouts = [
            self._to_rollout(i, prompt, choice, version)
            for i, prompt, per_prompt in zip(indices, prompt_ids, choices, strict=True)
            for choice in per_prompt
        ]
        if self.tokenizer is not None:
            texts = self.tokenizer.batch_decode(
                [r.completion_ids for r in rollouts], skip_special_tokens=True
            )
            for r, text in zip(rollouts, texts, strict=True):
                r.text = text
        return rollouts

    def _request(self, i: int, ids: list[int], sampling: SamplingConfig) -> list[dict[str, Any]]:
        url = self.urls[i % len(self.urls)]
        body: dict[str, Any] = {
            "model": self.models[url],
            "prompt": list(ids),
            "n": sampling.n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed + i * sampling.n
        out = self._call("POST", url, "/v1/completions", body)
        choices = sorted(out["choices"], key=lambda c: c["index"])
        if len(choices) != sampling.n:
            raise RolloutServerError(
                f"rollout server {url}: asked for n={sampling.n} samples, got {len(choices)}"
            )
        return choices

    def _to_rollout(
        self, i: int, prompt: list[int], choice: dict[str, Any], version: int
    ) -> Rollout:
        ids = [int(t) for t in choice["token_ids"]]
        logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
        if len(logprobs) != len(ids):
            raise RolloutServerError(
                f"rollout server {self.urls[i % len(self.urls)]}: {len(ids)} tokens but "
                f"{len(logprobs)} logprobs in a completion"
            )
        return Rollout(
            prompt_index=i,
            prompt_ids=list(prompt),
            completion_ids=ids,
            logprobs=logprobs,
            text=choice.get("text", ""),
            finish_reason="stop" if choice.get("finish_reason") == "stop" else "length",
            weight_version=version,
        )

    # --------------------------------------------------------------- weights
    def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> float:
        """Push the weights to every server: a file + reload, or NCCL (`weight_transfer`).

        File: written as `<weights_dir>/v<version>/model.safetensors` (the previous version's
        file is removed), then every server reloads it. NCCL: streamed from this process.

        Args:
            named_tensors: (name, tensor) pairs in HF naming (the full state dict), read once.
            version: the new weight_version stamped on later rollouts.

        Returns:
            Seconds taken (write/transfer + reloads + fingerprints).
        """
        from safetensors.torch import save_file

        start = time.perf_counter()
        if self.weight_transfer == "nccl":
            self._push_nccl(named_tensors, version)
            for url in self.urls:
                self._call("POST", url, "/reset_prefix_cache")
                self.fingerprints[url] = self.fingerprint(url)
            self.weight_version = version
            return time.perf_counter() - start
        target = self.weights_dir / f"v{version}"
        tmp = self.weights_dir / f".v{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_unique_tensors(named_tensors), str(tmp / "model.safetensors"), {"format": "pt"})
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        previous, self.weights_path = self.weights_path, target
        for url in self.urls:
            self._reload(url, target)
        self.weight_version = version
        if previous is not None and previous != target and previous.parent == self.weights_dir:
            shutil.rmtree(previous, ignore_errors=True)  # only our own files, never a model dir
        return time.perf_counter() - start

    def load_from_path(self, path: str | Path, version: int = 0) -> float:
        """Push the weights of an HF model directory (e.g. the run's start) to every server.

        A server may hold weights of an earlier run: the trainer calls this once at start so
        version 0 really is `model.path`. The checkpoint's tensors are re-written as a weight
        file (with a tied `lm_head.weight` spelled out: vLLM's in-place reload keeps the old
        head when the checkpoint omits it).

        Returns:
            Seconds taken.
        """
        return self.load_weights(checkpoint_tensors(path), version)

    def _reload(self, url: str, path: Path) -> None:
        """Reload one server from `path`, reset its prefix cache, record its new fingerprint."""
        self._call(
            "POST",
            url,
            "/collective_rpc",
            {
                "method": "reload_weights",
                "kwargs": {"weights_path": str(path.resolve())},
                "timeout": self.timeout_s,
            },
        )
        self._call("POST", url, "/reset_prefix_cache")
        self.fingerprints[url] = self.fingerprint(url)

    def _push_nccl(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Broadcast the weights into every server over NCCL (CUDA; untested on GPU).

        The first call opens one NCCL group per server (`rollout.server_nccl_address/port`):
        vLLM's `NCCLTrainerWeightTransferEngine` with this process as the sender.
        """
        from posttrain.rollout import nccl_push

        if self._nccl is None:
            self._nccl = nccl_push.NCCLServerPush(
                self.urls,
                self._call,
                address=self.nccl_address,
                port=self.nccl_port,
                timeout_s=self.timeout_s,
            )
        self._nccl.push(named_tensors, version)

    def check_versions(self) -> None:
        """Make sure every server still holds `weight_version`; re-push a restarted one.

        Raises:
            RolloutServerError: a server's weights are unknown and cannot be restored (no
                kept file, or still different after a re-push).
        """
        for url in self.urls:
            if self.fingerprint(url) == self.fingerprints[url]:
                continue
            if self.weight_transfer == "nccl":
                raise RolloutServerError(
                    f"rollout server {url}: its weights changed (restarted?) and NCCL weight "
                    f"transfer keeps no copy of version {self.weight_version} to re-push"
                )
            if self.weights_path is None or not self.weights_path.is_dir():
                raise RolloutServerError(
                    f"rollout server {url}: its weights changed (restarted with other weights?) "
                    f"and no weight file of version {self.weight_version} is kept to re-push"
                )
            expected = self.fingerprints[url]
            self._reload(url, self.weights_path)
            if self.fingerprints[url] != expected:
                raise RolloutServerError(
                    f"rollout server {url}: its weights changed (restarted?) and a re-push of "
                    f"version {self.weight_version} from {self.weights_path} did not restore them"
                )
            self.repushes += 1

    def close(self) -> None:
        """Close the HTTP client and any NCCL groups (the servers keep running)."""
        if self._nccl is not None:
            self._nccl.shutdown()
        self.client.close()
