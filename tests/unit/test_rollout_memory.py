"""GPU memory sizing and the sleep/wake order of a colocated vLLM (rollout/memory.py).

vLLM's sleep mode exists only on CUDA, so the order of calls is checked against a recorder with
vLLM's `sleep(level=)` / `wake_up(tags=)` signature; the sizing is plain arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.rollout.memory import (
    SleepCycle,
    count_params,
    kv_bytes_per_token,
    vllm_memory_fraction,
)

GIB = 1 << 30
# Qwen2-7B's attention shape: 28 layers, 28 query heads, 4 KV heads, head_dim 3584 / 28 = 128.
QWEN7B = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
          "hidden_size": 3584}  # fmt: skip


def test_kv_bytes_per_token() -> None:
    assert kv_bytes_per_token(QWEN7B, 2) == 2 * 28 * 4 * 128 * 2  # 57344
    # no num_key_value_heads: every head has its own K/V; head_dim = hidden / heads
    tiny = {"num_hidden_layers": 4, "num_attention_heads": 4, "hidden_size": 128}
    assert kv_bytes_per_token(tiny, 4) == 2 * 4 * 4 * 32 * 4
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        kv_bytes_per_token({"hidden_size": 8}, 2)


def test_memory_fraction_adds_weights_kv_and_overhead() -> None:
    params, seqs, length, total = 7_600_000_000, 64, 2048, 80 * GIB
    weights = params * 2
    kv = seqs * length * 57344
    overhead = max(GIB, 0.1 * weights)  # 10% of the weights beats the 1 GiB floor here
    expected = (weights + kv + overhead) / total
    got = vllm_memory_fraction(
        num_params=params,
        model_config=QWEN7B,
        dtype_bytes=2,
        max_model_len=length,
        concurrent_seqs=seqs,
        total_bytes=total,
    )
    assert got == pytest.approx(expected, rel=1e-12)
    assert 0.28 < got < 0.29  # 24.2e9 bytes of 80 GiB


def test_memory_fraction_clips_small_and_rejects_too_big() -> None:
    small = {"num_hidden_layers": 4, "num_attention_heads": 4, "hidden_size": 128}
    kw = {"model_config": small, "dtype_bytes": 4, "max_model_len": 64, "concurrent_seqs": 8}
    assert vllm_memory_fraction(num_params=800_000, total_bytes=80 * GIB, **kw) == 0.05
    with pytest.raises(ConfigError, match=r"needs .* GiB .*prompts_per_step"):
        vllm_memory_fraction(
            num_params=70_000_000_000,
            model_config=QWEN7B,
            dtype_bytes=2,
            max_model_len=4096,
            concurrent_seqs=256,
            total_bytes=80 * GIB,
        )


def test_count_params_matches_the_loaded_model(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    n, config = count_params(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert n == sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert config.num_hidden_layers == model.config.num_hidden_layers


class Recorder:
    """vLLM's sleep-mode surface, recording calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", tuple(tags or ())))
        return True


def test_sleep_cycle_order_level1() -> None:
    llm = Recorder()
    cycle = SleepCycle(llm, 1)
    cycle.before_generate()  # awake at start: nothing to do
    cycle.after_generate()
    cycle.before_load()  # weights first, the KV cache stays released while they load
    cycle.before_generate()
    cycle.after_generate()
    cycle.before_generate()  # no sync in between: level 1 kept the weights, wake both
    assert llm.calls == [
        ("sleep", 1),
        ("wake_up", ("weights",)),
        ("wake_up", ("kv_cache",)),
        ("sleep", 1),
        ("wake_up", ("kv_cache", "weights")),
    ]
    assert cycle.asleep == set()


def test_sleep_cycle_level2_needs_a_load_and_level0_is_silent() -> None:
    llm = Recorder()
    cycle = SleepCycle(llm, 2)
    cycle.after_generate()
    with pytest.raises(RuntimeError, match="sleep_level=2"):
        cycle.before_generate()
    cycle.before_load()
    cycle.before_generate()
    assert llm.calls == [("sleep", 2), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]

    off = Recorder()
    cycle = SleepCycle(off, 0)
    cycle.after_generate()
    cycle.before_load()
    cycle.before_generate()
    assert off.calls == []
    with pytest.raises(ConfigError, match="sleep_level=3"):
        SleepCycle(off, 3)


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.gpu_memory_utilization=1.5", "gpu_memory_utilization=1.5"),
        ("rollout.gpu_memory_utilization=half", "'auto' or a number"),
        ("rollout.sleep_level=3", "sleep_level=3"),
    ],
)
def test_config_rejects_bad_memory_settings(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("recipes/quickstart.yaml", [override])


def test_config_rejects_sleep_with_async_or_level2_adapter() -> None:
    with pytest.raises(ConfigError, match="max_staleness=0"):
        load_config("recipes/quickstart.yaml", ["rollout.sleep_level=1", "rollout.max_staleness=1"])
    with pytest.raises(ConfigError, match="sleep_level=1"):
        load_config(
            "recipes/quickstart.yaml",
            ["rollout.sleep_level=2", "model.lora.r=4", "model.lora.sync=adapter"],
        )
    cfg = load_config("recipes/quickstart.yaml", ["rollout.gpu_memory_utilization=0.4"])
    assert cfg.rollout.gpu_memory_utilization == 0.4
    assert load_config("recipes/quickstart.yaml").rollout.gpu_memory_utilization == "auto"
