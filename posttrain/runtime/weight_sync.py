"""Stream the trainer's full weights into a rollout engine, a bounded bucket at a time.

`stream_weights(engine)` yields `(name, tensor)` pairs in the exported model's own (HF) naming,
the full parameters and persistent buffers of its state dict (a tied weight under each of its
names, e.g. `lm_head.weight` and `model.embed_tokens.weight`), without building the whole dict:

- ZeRO-3: parameters are gathered a bucket at a time with `deepspeed.zero.GatheredParameters`
  (one collective per bucket; every rank must consume the whole stream, in the same order).
  A bucket holds whole modules' parameters, at most `bucket_numel` elements (a single larger
  tensor, e.g. the embedding, is a bucket by itself). Gathered tensors are cloned before the
  partition is released, so the rollout engine may keep references while it assembles a layer
  (vLLM buffers q/k/v until the fused qkv projection is complete); at most about one bucket is
  alive beyond the engine's own weights.
- ZeRO-0/1/2: every rank holds the full parameters; they are yielded as they are (no copy).
- LoRA (peft): the base weight and its `lora_A`/`lora_B` always share a bucket, and each bucket is
  merged with `lora.merge_lora_state_dict` (W + scale * B @ A, out of place) under the base
  model's names.
- A module that trains more than it exports (PPO's `ActorCritic`) streams only
  `module.export_module()` (the policy), so the critic is never gathered.

`push_weights(engine, rollout, version)` feeds the stream to `rollout.load_weights` and reports
`time/sync_s` (whole sync) and `time/sync_gather_s` (gather + merge inside the stream).

`push_adapter(engine, rollout, version)` (`model.lora.sync: adapter`) gathers only the LoRA
matrices (one ZeRO-3 `GatheredParameters` over the lora_A/lora_B parameters) and hands them to
`rollout.load_adapter` with the adapter config; the base weights are never gathered or sent.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import Any

import torch

from posttrain.runtime import lora, phase_trace

# 2**27 elements: 256 MiB of bf16 (a 7B model's decoder layer is ~0.2e9 elements: about one).
DEFAULT_BUCKET_NUMEL = 1 << 27


def _is_zero3(engine: Any) -> bool:
    return getattr(engine, "zero_optimization_stage", lambda: 0)() == 3


def _full_numel(param: torch.nn.Parameter) -> int:
    """Elements of the full parameter (ZeRO-3 keeps only a partition in `param`)."""
    return int(getattr(param, "ds_numel", param.numel()))


def _owner(name: str) -> str:
    """The module a parameter belongs to, with a LoRA layer's base and adapters together."""
    if ".lora_" in name:
        return name.split(".lora_")[0]
    if ".base_layer." in name:
        return name.split(".base_layer.")[0]
    return name.rpartition(".")[0]


def parameter_buckets(
    module: torch.nn.Module, bucket_numel: int = DEFAULT_BUCKET_NUMEL
) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Split `module.named_parameters()` into buckets of whole modules, in order.

    Args:
        module: the model (its parameters may be ZeRO-3 partitions).
        bucket_numel: a bucket is closed before it would exceed this many (full) elements.

    Returns:
        Lists of (name, parameter); every name of `named_parameters(remove_duplicate=False)`
        appears once; all parameters of one owner module (a LoRA layer: base weight, bias,
        lora_A, lora_B) share a bucket, and a tied parameter's names share its first bucket.
    """
    owners: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    first_owner: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        # A tied weight (lm_head = embed_tokens) joins its first name's bucket: one gather,
        # both names sent (vLLM's in-place reload keeps a tied head's old tensor otherwise).
        owner = first_owner.setdefault(id(param), _owner(name))
        owners.setdefault(owner, []).append((name, param))
    buckets: list[list[tuple[str, torch.nn.Parameter]]] = []
    current: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    for group in owners.values():
        numel = sum(_full_numel(p) for p in {id(p): p for _, p in group}.values())
        if current and size + numel > bucket_numel:
            buckets.append(current)
            current, size = [], 0
        current.extend(group)
        size += numel
    if current:
        buckets.append(current)
    return buckets


def _persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, sub in module.named_modules():
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf.detach()
    return out


def stream_weights(
    engine: Any,
    bucket_numel: int = DEFAULT_BUCKET_NUMEL,
    stats: dict[str, float] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the exported model's full weights (see the module docstring), bucket by bucket.

    Args:
        engine: a DeepSpeed engine or a plain module (peft models are merged).
        bucket_numel: bucket size bound in elements.
        stats: if given, `stats["gather_s"]` accumulates the seconds spent gathering/merging.

    Yields:
        (name, tensor) on the parameters' device, named like `model.state_dict()` (merged
        LoRA: the base model's names; PPO's ActorCritic: the policy's own names).
    """
    module = engine.module if hasattr(engine, "module") else engine
    if hasattr(module, "export_module"):
        module = module.export_module()
    zero3 = _is_zero3(engine)
    merge = None
    if lora.is_peft(module):
        merge = functools.partial(
            lora.merge_lora_state_dict,
            layers=lora.lora_layers(module),
            adapter=module.active_adapter,
        )
    buckets: list[Any] = parameter_buckets(module, bucket_numel)
    buckets.append(list(_persistent_buffers(module).items()))
    for bucket in buckets:
        start = time.perf_counter()
        part = _gather(bucket, zero3)
        if merge is not None:
            part = merge(part)
        if stats is not None:
            stats["gather_s"] = stats.get("gather_s", 0.0) + time.perf_counter() - start
        yield from part.items()
        del part


def _gather(bucket: list[tuple[str, torch.Tensor]], zero3: bool) -> dict[str, torch.Tensor]:
    """{name: full tensor} of one bucket (cloned out of the ZeRO-3 gather, else as is).

    Tied names share one tensor (gathered and cloned once).
    """
    unique = {id(t): t for _, t in bucket}
    params = [t for t in unique.values() if hasattr(t, "ds_id")]
    if not zero3 or not params:
        return {name: t.detach() for name, t in bucket}
    import deepspeed

    with deepspeed.zero.GatheredParameters(params), torch.no_grad():
        full = {key: t.detach().clone() for key, t in unique.items()}
    return {name: full[id(t)] for name, t in bucket}


def push_weights(engine: Any, rollout: Any, version: int) -> dict[str, float]:
    """Stream `engine`'s weights into `rollout.load_weights` (every rank calls this).

    The stream is drained after `load_weights` returns, so an engine that stops early cannot
    leave the other ranks waiting in a ZeRO-3 gather.

    Returns:
        `time/sync_s` (the whole sync), `time/sync_gather_s` (gathering and merging).
    """
    stats: dict[str, float] = {}
    start = time.perf_counter()
    with phase_trace.span("weight sync"):  # POSTTRAIN_PHASE_TRACE (opt-in)
        stream = stream_weights(engine, stats=stats)
        rollout.load_weights(stream, version)
        for _ in stream:  # no-op when load_weights consumed everything
            pass
    return {
        "time/sync_s": time.perf_counter() - start,
        "time/sync_gather_s": stats.get("gather_s", 0.0),
    }


def gather_adapter(engine: Any) -> dict[str, torch.Tensor]:
    """The trainer's LoRA matrices, full (ZeRO-3: gathered and cloned), under peft's saved names.

    Every rank must call this (ZeRO-3 gathers collectively).

    Returns:
        `lora.adapter_tensors` of the peft model: `...lora_A.weight` [r, in] and
        `...lora_B.weight` [out, r] per adapted module.
    """
    module = engine.module if hasattr(engine, "module") else engine
    params = [(n, p) for n, p in module.named_parameters() if lora.is_adapter_key(n)]
    if not params:
        raise ValueError("model.lora.sync=adapter: the trained model has no LoRA parameters")
    return lora.adapter_tensors(_gather(params, _is_zero3(engine)), module.active_adapter)


def push_adapter(engine: Any, rollout: Any, version: int) -> dict[str, float]:
    """Hand only the LoRA adapter to `rollout.load_adapter` (every rank calls this).

    Returns:
        `time/sync_s` (the whole sync), `time/sync_gather_s` (gathering the adapter).
    """
    start = time.perf_counter()
    tensors = gather_adapter(engine)
    gathered = time.perf_counter()
    module = engine.module if hasattr(engine, "module") else engine
    rollout.load_adapter(tensors, lora.adapter_config(module), version)
    return {
        "time/sync_s": time.perf_counter() - start,
        "time/sync_gather_s": gathered - start,
    }
