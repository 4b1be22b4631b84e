"""`train.offload_optimizer` / `train.offload_params`: validation and the DeepSpeed config made."""

from __future__ import annotations

import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.runtime import distributed as dist


def test_offload_needs_a_zero_stage():
    with pytest.raises(ConfigError, match=r"train\.offload_optimizer needs train\.zero_stage"):
        load_config(None, ["train.offload_optimizer=true"])
    with pytest.raises(ConfigError, match=r"train\.offload_params needs train\.zero_stage=3"):
        load_config(None, ["train.offload_params=true", "train.zero_stage=2"])
    cfg = load_config(
        None, ["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true"]
    )
    assert cfg.train.offload_optimizer and cfg.train.offload_params


def test_offload_deepspeed_config():
    base = {"zero_stage": 3, "micro_batch": 2, "max_grad_norm": 1.0, "dtype": "float32"}
    plain = dist.deepspeed_config(**base)
    assert "zero_force_ds_cpu_optimizer" not in plain
    assert set(plain["zero_optimization"]) == {"stage"}
    both = dist.deepspeed_config(**base, offload_optimizer=True, offload_params=True)
    # posttrain's torch AdamW steps on the CPU: DeepSpeed must accept a client optimizer
    assert both["zero_force_ds_cpu_optimizer"] is False
    zero = both["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    opt_only = dist.deepspeed_config(**{**base, "zero_stage": 2}, offload_optimizer=True)
    assert "offload_param" not in opt_only["zero_optimization"]
