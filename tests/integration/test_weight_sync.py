"""Streamed weight sync (`posttrain.runtime.weight_sync`) equals the full state dict it replaces.

Plain, LoRA-merged, and DeepSpeed ZeRO-3 (one process, gloo; with and without CPU offload of
parameters and optimizer state) models: the streamed (name, tensor) pairs equal
`checkpoint.full_state_dict`, buckets never split a LoRA layer, and pushing the stream into an
engine reports `time/sync_s`.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.config import LoRAConfig
from posttrain.models import load_policy
from posttrain.runtime import distributed as dist
from posttrain.runtime import lora
from posttrain.runtime.checkpoint import full_state_dict
from posttrain.runtime.weight_sync import parameter_buckets, push_weights, stream_weights


def _randomise_adapters(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _assert_same(streamed: list[tuple[str, torch.Tensor]], full: dict[str, torch.Tensor]):
    names = [n for n, _ in streamed]
    assert len(names) == len(set(names))  # each tensor once
    assert set(names) == set(full)
    for name, tensor in streamed:
        assert torch.equal(tensor.cpu(), full[name]), name


class Recorder:
    """An engine that keeps what it is given (like vLLM, it may hold tensors until the end)."""

    weight_version = 0

    def __init__(self) -> None:
        self.got: dict[str, torch.Tensor] = {}

    def load_weights(self, named_tensors, version: int) -> float:
        for name, tensor in named_tensors:
            self.got[name] = tensor.detach().cpu().clone()
        self.weight_version = version
        return 0.0


@pytest.mark.parametrize("bucket_numel", [1, 20_000, 1 << 30])
def test_plain_model_stream_equals_state_dict(tiny_model_dir, bucket_numel):
    model = load_policy(tiny_model_dir)
    buckets = parameter_buckets(model, bucket_numel)
    names = [n for b in buckets for n, _ in b]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters(remove_duplicate=False))
    if bucket_numel == 1:  # one module per bucket (weight and bias together; tied head joins)
        owners = [{n.rpartition(".")[0] for n, _ in b} - {"lm_head"} for b in buckets]
        assert all(len(o) == 1 for o in owners)
    streamed = list(stream_weights(model, bucket_numel))
    _assert_same(streamed, full_state_dict(model))


def test_lora_stream_is_merged_and_never_splits_a_layer(tiny_model_dir):
    model = load_policy(tiny_model_dir, lora=LoRAConfig(r=4, alpha=8.0))
    _randomise_adapters(model)
    for bucket in parameter_buckets(model, 1):
        names = [n for n, _ in bucket]
        for n in names:
            if ".lora_A." in n:
                owner = n.split(".lora_")[0]
                assert f"{owner}.base_layer.weight" in names
                assert any(x.startswith(f"{owner}.lora_B.") for x in names)
    streamed = list(stream_weights(model, 1))
    merged = full_state_dict(model)
    assert not any(".lora_" in k or "base_layer" in k for k in merged)
    _assert_same(streamed, merged)
    recorder = Recorder()
    metrics = push_weights(model, recorder, version=2)
    assert recorder.weight_version == 2 and set(recorder.got) == set(merged)
    assert metrics["time/sync_s"] >= metrics["time/sync_gather_s"] >= 0


def _zero3_engine(model: torch.nn.Module, offload: bool):
    dist.init_distributed()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    cfg = dist.deepspeed_config(
        zero_stage=3,
        micro_batch=2,
        max_grad_norm=1.0,
        dtype="float32",
        offload_optimizer=offload,
        offload_params=offload,
    )
    return dist.build_engine(model, optimizer, None, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("use_lora", [False, True])
def test_zero3_stream_equals_unpartitioned_weights(tiny_model_dir, offload, use_lora):
    model = load_policy(tiny_model_dir, lora=LoRAConfig(r=4, alpha=8.0) if use_lora else None)
    if use_lora:
        _randomise_adapters(model)
    expected = full_state_dict(model)  # before DeepSpeed partitions anything
    engine = _zero3_engine(model, offload)
    assert engine.zero_optimization_stage() == 3
    assert all(p.numel() == 0 for p in engine.module.parameters())  # partitioned
    _assert_same(list(stream_weights(engine, bucket_numel=50_000)), expected)
    # a training step (offloaded AdamW on the CPU) then a sync: the stream has the new weights
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    recorder = Recorder()
    metrics = push_weights(engine, recorder, version=1)
    assert metrics["time/sync_s"] > 0
    full = full_state_dict(engine)  # ZeRO-3: tied lm_head only as embed_tokens; sync sends both
    full.setdefault("lm_head.weight", full["model.embed_tokens.weight"])
    _assert_same(list(recorder.got.items()), full)
    changed = [k for k in expected if not torch.equal(expected[k], recorder.got[k])]
    assert changed
    assert lora.is_peft(engine.module) == use_lora
