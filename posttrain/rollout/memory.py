"""GPU memory sizing for a colocated vLLM engine (`rollout.gpu_memory_utilization: auto`).

A colocated engine shares the GPU with the trainer, so vLLM must not take its default 90%: it
gets what one step's rollouts need, as a fraction of the device's memory:

    weights   = parameters * dtype bytes
    kv_cache  = concurrent sequences * max_model_len * kv_bytes_per_token
    kv_bytes_per_token = 2 (K and V) * layers * kv_heads * head_dim * dtype bytes
    need      = weights + kv_cache + overhead (activations, CUDA graphs, allocator slack:
                max(overhead_gib, 10% of the weights))
    fraction  = clip(need / total, min_fraction, max_fraction)

vLLM reads `gpu_memory_utilization` as the share of the whole device this instance may hold
(weights, activation peak and KV cache together); KV blocks beyond the need are just more room.
With `rollout.sleep_level` > 0 the same memory is handed back to the trainer between rollouts.
"""

from __future__ import annotations

from typing import Any

from posttrain.errors import ConfigError

_GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def kv_bytes_per_token(model_config: Any, dtype_bytes: int) -> int:
    """Bytes of K and V cache one token takes over all layers.

    Args:
        model_config: a transformers config (or its dict): num_hidden_layers,
            num_attention_heads, hidden_size, and optionally num_key_value_heads, head_dim.
        dtype_bytes: bytes per cached element (2 for bf16/fp16, 4 for fp32).

    Raises:
        ConfigError: a size field is missing.
    """
    layers = _get(model_config, "num_hidden_layers")
    heads = _get(model_config, "num_attention_heads")
    hidden = _get(model_config, "hidden_size")
    if not layers or not heads or not hidden:
        raise ConfigError(
            "rollout.gpu_memory_utilization=auto: the model config lacks num_hidden_layers / "
            "num_attention_heads / hidden_size; set rollout.gpu_memory_utilization to a number"
        )
    kv_heads = _get(model_config, "num_key_value_heads") or heads
    head_dim = _get(model_config, "head_dim") or hidden // heads
    return 2 * int(layers) * int(kv_heads) * int(head_dim) * int(dtype_bytes)


def vllm_memory_fraction(
    *,
    num_params: int,
    model_config: Any,
    dtype_bytes: int,
    max_model_len: int,
    concurrent_seqs: int,
    total_bytes: int,
    overhead_gib: float = 1.0,
    min_fraction: float = 0.05,
    max_fraction: float = 0.9,
) -> float:
    """The `gpu_memory_utilization` that holds the weights and one step's KV cache.

    Args:
        num_params: parameters of the served model.
        model_config: its transformers config (see `kv_bytes_per_token`).
        dtype_bytes: bytes per weight and per cached element.
        max_model_len: prompt + completion tokens per sequence.
        concurrent_seqs: sequences generated at once (prompts_per_step * samples_per_prompt,
            this rank's share).
        total_bytes: the device's memory.
        overhead_gib: floor of the activation / CUDA-graph / allocator allowance.
        min_fraction, max_fraction: clip range of the result.

    Returns:
        A fraction in [min_fraction, max_fraction].

    Raises:
        ConfigError: the need exceeds `max_fraction` of the device (the message gives the
            numbers: shrink the batch or max lengths, or use a rollout server).
    """
    weights = num_params * dtype_bytes
    kv = concurrent_seqs * max_model_len * kv_bytes_per_token(model_config, dtype_bytes)
    need = weights + kv + max(overhead_gib * _GIB, 0.1 * weights)
    fraction = need / total_bytes
    if fraction > max_fraction:
        raise ConfigError(
            f"rollout.gpu_memory_utilization=auto: vLLM needs {need / _GIB:.1f} GiB (weights "
            f"{weights / _GIB:.1f} + KV cache {kv / _GIB:.1f} for {concurrent_seqs} sequences x "
            f"{max_model_len} tokens), more than {max_fraction:.0%} of the "
            f"{total_bytes / _GIB:.1f} GiB device; lower rollout.prompts_per_step x "
            "samples_per_prompt or the max lengths, or use rollout.engine=server"
        )
    return min(max(fraction, min_fraction), max_fraction)


class SleepCycle:
    """When a colocated vLLM sleeps (`rollout.sleep_level`), and the order it wakes in.

    generate -> sleep(level)           (weights to CPU (1) or dropped (2); KV cache dropped)
    [training runs with the memory back]
    sync     -> wake weights, reload   (the KV cache stays released while weights load)
    generate -> wake KV cache, sample, sleep again

    Level 2 drops the weights, so they must be reloaded before sampling: `before_generate`
    raises if a level-2 sleep was not followed by a weight load. Level 0 does nothing.

    Args:
        llm: an object with vLLM's `sleep(level=)` and `wake_up(tags=)` (a `vllm.LLM`).
        level: 0 (off), 1 or 2.
    """

    def __init__(self, llm: Any, level: int) -> None:
        if level not in (0, 1, 2):
            raise ConfigError(f"rollout.sleep_level={level}: valid values are 0, 1, 2")
        self.llm, self.level = llm, level
        self.asleep: set[str] = set()  # subset of {"weights", "kv_cache"}

    def after_generate(self) -> None:
        """Release the engine's memory until the next sync / generate."""
        if self.level:
            self.llm.sleep(level=self.level)
            self.asleep = {"weights", "kv_cache"}

    def before_load(self) -> None:
        """Reallocate the weights only (they are overwritten next)."""
        if "weights" in self.asleep:
            self.llm.wake_up(tags=["weights"])
            self.asleep.discard("weights")

    def before_generate(self) -> None:
        """Wake whatever still sleeps; refuse to sample from dropped weights.

        Raises:
            RuntimeError: level 2 slept and no weights were loaded since.
        """
        if not self.asleep:
            return
        if self.level == 2 and "weights" in self.asleep:
            raise RuntimeError(
                "rollout.sleep_level=2 dropped vLLM's weights and no weight sync ran before the "
                "next generation; use sleep_level=1 or sync weights after every step"
            )
        self.llm.wake_up(tags=sorted(self.asleep))
        self.asleep = set()


def count_params(model_path: str) -> tuple[int, Any]:
    """(parameter count, transformers config) of a causal LM directory, built on the meta device
    (nothing is loaded; tied weights count once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()), config


def auto_memory_fraction(
    model_path: str, dtype: str, max_model_len: int, concurrent_seqs: int
) -> float:
    """`vllm_memory_fraction` for a model directory on the current CUDA device.

    The dtype is `dtype`, or the checkpoint's own for "auto".
    """
    import torch

    num_params, config = count_params(model_path)
    if dtype == "auto":
        dtype = str(getattr(config, "torch_dtype", None) or "bfloat16").replace("torch.", "")
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return vllm_memory_fraction(
        num_params=num_params,
        model_config=config,
        dtype_bytes=DTYPE_BYTES.get(dtype, 2),
        max_model_len=max_model_len,
        concurrent_seqs=concurrent_seqs,
        total_bytes=total,
    )
