"""LoRA through peft: merged weights equal peft's own merge; GRPO trains adapters only and the
merged weights pushed into vLLM reproduce the trainer's logprobs."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import posttrain.trainer as trainer_mod
from posttrain.config import LoRAConfig, load_config
from posttrain.errors import ConfigError
from posttrain.models import load_policy
from posttrain.runtime import lora

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny matmuls: one thread avoids OpenMP hand-offs that cost seconds on a loaded machine."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """lora_B starts at zero (merge = no-op); give every adapter tensor random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_lora_policy_trains_adapters_only(tiny_model_dir):
    model = load_policy(tiny_model_dir, lora=LoRAConfig(r=4, alpha=8.0))
    assert lora.is_peft(model) and model.training
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # Every target module of every layer is adapted (4 layers x 7 modules x A and B).
    assert len(trainable) == 4 * len(TARGETS) * 2
    assert not lora.is_peft(load_policy(tiny_model_dir, lora=LoRAConfig(r=0)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_state_dict_equals_peft_merge_and_unload(tiny_model_dir, dtype):
    plain_keys = set(load_policy(tiny_model_dir, dtype=dtype).state_dict())
    model = load_policy(tiny_model_dir, dtype=dtype, lora=LoRAConfig(r=4, alpha=8.0))
    _randomise_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    merged = lora.merged_state_dict(model, model.state_dict())
    want = copy.deepcopy(model).merge_and_unload().state_dict()

    # Base-model names only: no peft prefix, no .base_layer, no adapter tensors.
    assert set(merged) == set(want) == plain_keys
    assert not any(".lora_" in k or "base_layer" in k or k.startswith("base_model") for k in merged)
    tol = 1e-6 if dtype == "float32" else 1e-2  # bf16: one rounding of W + delta either way
    for key, value in want.items():
        assert merged[key].dtype == value.dtype, key
        assert (merged[key].float() - value.float()).abs().max().item() < tol, key
    # Adapted weights really moved; the training model was not modified.
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[name], before[f"base_model.model.{name[:-7]}.base_layer.weight"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_by_hand_formula(tiny_model_dir):
    """W + (alpha / r) * B @ A for one module, computed independently."""
    model = load_policy(tiny_model_dir, lora=LoRAConfig(r=2, alpha=6.0, target_modules=("v_proj",)))
    _randomise_adapters(model, seed=3)
    state = model.state_dict()
    merged = lora.merged_state_dict(model, state)
    pre = "base_model.model.model.layers.1.self_attn.v_proj"
    w, a, b = (
        state[f"{pre}.{k}"]
        for k in ("base_layer.weight", "lora_A.default.weight", "lora_B.default.weight")
    )
    want = w.clone()
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            want[i, j] += 3.0 * sum(float(b[i, k] * a[k, j]) for k in range(2))
    assert (merged["model.layers.1.self_attn.v_proj.weight"] - want).abs().max() < 1e-6
    # Untargeted modules pass through unchanged.
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(merged[q], state[f"base_model.model.{q}"])


def test_lora_config_errors(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"model\.lora\.r"):
        load_config(None, ["model.lora.r=-1"])
    with pytest.raises(ConfigError, match=r"model\.lora\.alpha"):
        load_config(None, ["model.lora.r=4", "model.lora.alpha=0"])
    with pytest.raises(ConfigError, match=r"model\.lora\.rank"):
        load_config(None, ["model.lora.rank=4"])  # unknown key names the closest one
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules"):
        load_policy(tiny_model_dir, lora=LoRAConfig(r=4, target_modules=("no_such_proj",)))


# --------------------------------------------------------------------------- end to end
def _grpo_module():
    """tests/integration/test_grpo_train.py (its `small_cfg`), whatever pytest's import mode."""
    path = Path(__file__).with_name("test_grpo_train.py")
    spec = importlib.util.spec_from_file_location("_posttrain_test_grpo_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["merged", "adapter"])
def test_grpo_lora_vllm_sync(tmp_path, tiny_model_dir, sync):
    from safetensors.torch import load_file

    lora_args = (
        "model.lora.r=8",
        "model.lora.alpha=16",
        "optim.lr=1e-2",
        f"model.lora.sync={sync}",
    )
    cfg = _grpo_module().small_cfg(tmp_path / "run", tiny_model_dir, *lora_args)
    trainer = trainer_mod.Trainer(cfg)
    module = trainer.engine.module
    assert lora.is_peft(module)
    start = {k: v.detach().clone() for k, v in module.state_dict().items()}
    history = trainer.train()

    assert len(history) == 2 and history[-1]["weight_version"] == 2.0
    for m in history:
        # vLLM sampled with the weights (merged, or base + adapter) the trainer pushed.
        assert m["tis/mismatch_abs_mean"] < 1e-4
        assert m["time/sync_s"] > 0
    if sync == "adapter":
        rollout = trainer.algorithm.source.engine
        assert rollout.lora_request is not None and rollout.weight_version == 2
        assert rollout.llm.llm_engine.list_loras() == {rollout.lora_request.lora_int_id}
    end = module.state_dict()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    assert any(".lora_B." in k for k in changed)

    final = tmp_path / "run" / "checkpoints" / "final"
    merged = load_file(str(final / "model.safetensors"))
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(merged) == set(initial)
    assert not torch.equal(
        merged["model.layers.0.mlp.down_proj.weight"],
        initial["model.layers.0.mlp.down_proj.weight"],
    )
    assert torch.equal(merged["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    adapter = json.loads((final / lora.ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16
    assert (final / lora.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    # The merged checkpoint is a plain model: it reproduces the trained peft model's logits.
    plain = load_policy(final).eval()
    module.eval()
    ids = torch.tensor([[5, 17, 33, 2, 8, 60]])
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - module(input_ids=ids).logits).abs().max()
    assert diff < 1e-4


# --------------------------------------------------------------------------- adapter-only sync
def test_lora_adapter_sync_config_errors():
    with pytest.raises(ConfigError, match=r"model\.lora\.sync=adapter.*model\.lora\.r"):
        load_config(None, ["model.lora.sync=adapter"])
    with pytest.raises(ConfigError, match=r"model\.lora\.sync"):
        load_config(None, ["model.lora.r=4", "model.lora.sync=both"])
    with pytest.raises(ConfigError, match=r"model\.lora\.sync=adapter.*rollout\.engine=vllm"):
        load_config(None, ["model.lora.r=4", "model.lora.sync=adapter", "rollout.engine=hf"])
    with pytest.raises(ConfigError, match=r"cannot serve LoRA on \['lm_head'\]"):
        load_config(
            None,
            ["model.lora.r=4", "model.lora.sync=adapter", "model.lora.target_modules=[lm_head]"],
        )
    cfg = load_config(None, ["model.lora.r=4", "model.lora.sync=adapter"])
    assert cfg.model.lora.sync == "adapter"
    assert load_config(None, []).model.lora.sync == "merged"


def test_adapter_tensors_use_peft_saved_names(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    model = load_policy(tiny_model_dir, lora=LoRAConfig(r=2, target_modules=("v_proj",)))
    _randomise_adapters(model)
    ours = lora.adapter_tensors(model.state_dict())
    lora.save_adapter(model, tmp_path, model.state_dict())
    theirs = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(ours) == set(theirs) and len(ours) == 4 * 2
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    config = lora.adapter_config(model)
    assert json.loads(json.dumps(config)) == {**saved, "target_modules": ["v_proj"]}


def _max_logprob_diff(model: torch.nn.Module, rollouts) -> float:
    """max |vLLM logprob - trainer logprob| over the rollouts' completion tokens (temp 1)."""
    from posttrain.losses import token_logprobs

    worst = 0.0
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.completion_ids])
            logits = model(input_ids=ids).logits[:, len(r.prompt_ids) - 1 : -1]
            want = token_logprobs(logits.float(), ids[:, len(r.prompt_ids) :])[0]
            worst = max(worst, (want - torch.tensor(r.logprobs)).abs().max().item())
    return worst


@pytest.mark.slow
def test_vllm_adapter_sync_logprob_parity(tiny_model_dir):
    from posttrain.rollout.engine import SamplingConfig
    from posttrain.rollout.vllm_local import VLLMEngine
    from posttrain.runtime.weight_sync import push_adapter

    model = load_policy(tiny_model_dir, lora=LoRAConfig(r=4, alpha=8.0)).eval()
    _randomise_adapters(model)
    engine = VLLMEngine(
        str(tiny_model_dir), max_model_len=64, seed=0, lora_rank=4, lora_targets=TARGETS
    )
    prompts = [[5, 17, 33, 2], [8, 60, 9]]
    sampling = SamplingConfig(n=2, max_new_tokens=8, seed=3)

    before = engine.generate(prompts, sampling)  # base weights: the adapter is not there yet
    assert _max_logprob_diff(model, before) > 1e-2
    metrics = push_adapter(model, engine, version=1)
    assert metrics["time/sync_s"] >= metrics["time/sync_gather_s"] > 0
    after = engine.generate(prompts, sampling)
    assert {r.weight_version for r in after} == {1}
    assert _max_logprob_diff(model, after) < 1e-4

    # A new version replaces the old one in vLLM (adapters do not accumulate).
    _randomise_adapters(model, seed=1)
    first = engine.lora_request
    push_adapter(model, engine, version=2)
    assert engine.llm.llm_engine.list_loras() == {engine.lora_request.lora_int_id}
    assert engine.lora_request.lora_int_id != first.lora_int_id
    assert not Path(first.lora_path).exists() and Path(engine.lora_request.lora_path).is_dir()
    again = engine.generate(prompts, sampling)
    assert {r.weight_version for r in again} == {2}
    assert _max_logprob_diff(model, again) < 1e-4

    # Target modules vLLM cannot serve as LoRA (the LM head) are a clear error.
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules.*lm_head"):
        engine._check_lora_targets(("q_proj", "lm_head"))


class _AdapterRecorder:
    """A rollout engine stand-in that keeps what `load_adapter` was given."""

    weight_version = 0

    def load_adapter(self, tensors, config, version) -> float:
        self.tensors, self.config, self.weight_version = dict(tensors), config, version
        return 0.0


@pytest.mark.slow
def test_zero3_adapter_gather_sends_only_adapter_tensors(tiny_model_dir):
    from posttrain.runtime import distributed as dist
    from posttrain.runtime.weight_sync import push_adapter

    model = load_policy(tiny_model_dir, lora=LoRAConfig(r=4, alpha=8.0))
    _randomise_adapters(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # before ZeRO-3 partitions
    want = lora.adapter_tensors(state)
    dist.init_distributed()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ds = dist.deepspeed_config(zero_stage=3, micro_batch=2, max_grad_norm=1.0, dtype="float32")
    engine = dist.build_engine(model, optimizer, None, ds)
    assert all(p.numel() == 0 for p in engine.module.parameters())  # partitioned
    recorder = _AdapterRecorder()
    metrics = push_adapter(engine, recorder, version=3)
    assert metrics["time/sync_s"] > 0 and recorder.weight_version == 3
    assert set(recorder.tensors) == set(want) and len(want) == 4 * len(TARGETS) * 2
    for key, value in want.items():
        assert torch.equal(recorder.tensors[key], value), key
    assert recorder.config["r"] == 4 and recorder.config["lora_alpha"] == 8.0
    assert sorted(recorder.config["target_modules"]) == sorted(TARGETS)
