"""Rollout engines: in-process vLLM (`vllm`), vLLM servers (`server`), transformers (`hf`).

vllm is imported lazily (only when a `vllm` engine is made): the rest of posttrain runs
without it.
"""

from __future__ import annotations

from typing import Any

from posttrain.errors import ConfigError
from posttrain.rollout.engine import Rollout, RolloutEngine, SamplingConfig

__all__ = ["Rollout", "RolloutEngine", "SamplingConfig", "make_engine"]

ENGINE_KINDS = ("vllm", "hf", "server")


def make_engine(kind: str, model_path: str, **kw: Any) -> RolloutEngine:
    """Build a rollout engine.

    Args:
        kind: "vllm" -> `VLLMEngine(model_path, **kw)` (kw: max_model_len (required), seed,
            kv_cache_gib, gpu_memory_utilization, dtype, ...); "hf" -> `HFEngine` over
            `kw["model"]` if given (e.g. the policy itself) else a model loaded from model_path
            (kw: model, tokenizer, dtype, batch_size); "server" -> `ServerEngine` over the
            vLLM servers at `kw["urls"]` (kw: urls, weights_dir, timeout_s, tokenizer, ...;
            model_path is unused: the servers were started on it).
        model_path: local model directory (config.json + tokenizer) or hub name.

    Returns:
        An object satisfying `RolloutEngine`.
    """
    if kind == "vllm":
        from posttrain.rollout.vllm_local import VLLMEngine

        return VLLMEngine(model_path, **kw)
    if kind == "server":
        from posttrain.rollout.vllm_server import ServerEngine

        return ServerEngine(kw.pop("urls"), **kw)
    if kind == "hf":
        from posttrain.models import load_reference, load_tokenizer
        from posttrain.rollout.hf import HFEngine

        model = kw.pop("model", None)
        tokenizer = kw.pop("tokenizer", None)
        dtype = kw.pop("dtype", "float32")
        if model is None:
            model = load_reference(model_path, dtype)
        if tokenizer is None:
            tokenizer = load_tokenizer(model_path)
        return HFEngine(model, tokenizer, **kw)
    raise ConfigError(f"rollout.engine={kind!r}: valid values are {list(ENGINE_KINDS)}")
