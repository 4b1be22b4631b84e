"""LoRA through peft: merged weights equal peft's own merge; GRPO trains adapters only and the
merged weights pushed into vLLM reproduce the trainer's logprobs."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch

import posttrain.trainer as trainer_mod
from posttrain import lora
from posttrain.config import LoRAConfig, load_config
from posttrain.errors import ConfigError
from posttrain.models import load_policy

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


def _patch_trainer_lora(monkeypatch, cfg) -> None:
    """Until `Trainer._build_engine` passes `lora=cfg.model.lora` itself, pass it here."""
    if "lora" in inspect.getsource(trainer_mod.Trainer._build_engine):
        return

    def load_with_lora(*args, **kwargs):
        kwargs.setdefault("lora", cfg.model.lora)
        return load_policy(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "load_policy", load_with_lora)


@pytest.mark.slow
def test_grpo_lora_vllm_merged_sync(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    lora_args = ("model.lora.r=8", "model.lora.alpha=16", "optim.lr=1e-2")
    cfg = _grpo_module().small_cfg(tmp_path / "run", tiny_model_dir, *lora_args)
    _patch_trainer_lora(monkeypatch, cfg)
    trainer = trainer_mod.Trainer(cfg)
    module = trainer.engine.module
    assert lora.is_peft(module)
    start = {k: v.detach().clone() for k, v in module.state_dict().items()}
    history = trainer.train()

    assert len(history) == 2 and history[-1]["weight_version"] == 2.0
    for m in history:
        # vLLM sampled with the merged weights the trainer pushed: logprobs agree.
        assert m["tis/mismatch_abs_mean"] < 1e-4
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
