"""LoRA through peft: wrap the policy, and turn its state into merged base-model weights.

Training: `apply_lora` wraps a causal LM with peft LoRA adapters on `model.lora.target_modules`;
only the adapter matrices A [r, in] and B [out, r] require grad (the trainer's AdamW only sees
those). Rollout sync and checkpoints: `merge_lora_state_dict` turns the (possibly ZeRO-gathered)
state dict of the peft model into the plain model's state dict,

    W_merged = W + scale * B @ A        (scale = alpha / r, per target module)

under the base model's parameter names (no `base_model.model.` prefix, no `.base_layer`, no LoRA
tensors), computed out of place: the training model is never modified. vLLM's `reload_weights`
and `save_pretrained` therefore see an ordinary checkpoint. Adapter-only sync
(`model.lora.sync: adapter`) instead sends `adapter_tensors` + `adapter_config` (the content of
peft's `adapter_model.safetensors` / `adapter_config.json`), which vLLM serves as a LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ConfigError

PEFT_PREFIX = "base_model.model."
ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class LoraLayerInfo:
    """What merging one adapted module needs.

    Attributes:
        scale: alpha / r (or alpha / sqrt(r) with rsLoRA), as peft computed it.
        fan_in_fan_out: True when the base weight is stored [in, out] (GPT-2 Conv1D).
        merged: True when peft already merged the adapter into the base weight.
    """

    scale: float
    fan_in_fan_out: bool
    merged: bool


def apply_lora(model: torch.nn.Module, lora: Any) -> Any:
    """Wrap `model` with peft LoRA adapters (in place) and return the `PeftModel`.

    Args:
        model: a causal LM (e.g. Qwen2ForCausalLM).
        lora: `posttrain.config.LoRAConfig` (r > 0, alpha, dropout, target_modules).

    Raises:
        ConfigError: when no module of the model matches `model.lora.target_modules`.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(
            f"model.lora.target_modules={list(lora.target_modules)}: {str(err).splitlines()[0]}"
        ) from None
    peft_model.train()
    return peft_model


def is_peft(module: Any) -> bool:
    """True for a peft `PeftModel` (what `apply_lora` returns)."""
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def lora_layers(module: Any) -> dict[str, LoraLayerInfo]:
    """Adapted modules of a peft model, keyed by their name in the peft model's state dict.

    Raises:
        ConfigError: for adapter kinds a plain merge cannot express (DoRA, LoRA on embeddings or
            convolutions).
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    adapter = module.active_adapter
    out: dict[str, LoraLayerInfo] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        if not isinstance(layer, LoraLinear) or layer.use_dora.get(adapter, False):
            raise ConfigError(
                f"model.lora: module {name!r} ({type(layer).__name__}) cannot be merged; "
                "target only linear layers (e.g. q_proj, v_proj) without DoRA"
            )
        out[name] = LoraLayerInfo(
            scale=float(layer.scaling[adapter]),
            fan_in_fan_out=bool(layer.fan_in_fan_out),
            merged=adapter in layer.merged_adapters,
        )
    return out


def _base_name(key: str) -> str:
    name = key.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".")


def merge_lora_state_dict(
    state: dict[str, torch.Tensor],
    layers: dict[str, LoraLayerInfo],
    adapter: str = "default",
) -> dict[str, torch.Tensor]:
    """Merged base-model state dict from a peft state dict (pure; inputs are not modified).

    Args:
        state: the peft model's full state dict (`base_model.model.<name>.base_layer.weight`
            [out, in], `...lora_A.<adapter>.weight` [r, in], `...lora_B.<adapter>.weight`
            [out, r], other parameters and buffers under `base_model.model.<name>`).
        layers: `lora_layers(peft_model)`.
        adapter: the adapter name.

    Returns:
        `{base name: tensor}`: the plain model's keys, with W + scale * B @ A for adapted weights
        (computed in float32, returned in W's dtype).
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        owner = module.removesuffix(".base_layer")
        if ".lora_" in key:
            if key.split(".lora_")[0] not in layers:
                raise ConfigError(f"model.lora: cannot merge unexpected adapter tensor {key!r}")
            continue
        info = layers.get(owner) if module.endswith(".base_layer") else None
        if info is not None and leaf == "weight" and not info.merged:
            a = state[f"{owner}.lora_A.{adapter}.weight"].float()
            b = state[f"{owner}.lora_B.{adapter}.weight"].float()
            delta = (b @ a) * info.scale
            if info.fan_in_fan_out:
                delta = delta.T
            tensor = (tensor.float() + delta).to(tensor.dtype)
        out[_base_name(key)] = tensor
    return out


def merged_state_dict(module: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`merge_lora_state_dict(state, lora_layers(module))` with the module's active adapter."""
    return merge_lora_state_dict(state, lora_layers(module), adapter=module.active_adapter)


def save_adapter(module: Any, out_dir: Path, state: dict[str, torch.Tensor]) -> Path:
    """Write the adapter (`adapter_config.json` + `adapter_model.safetensors`) to `out_dir`.

    Args:
        module: the peft model.
        out_dir: target directory (created).
        state: the peft model's full (gathered) state dict; peft keeps only the adapter tensors.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    return out_dir


def is_adapter_key(name: str) -> bool:
    """True for a LoRA adapter matrix (`...lora_A.<adapter>.weight` / `...lora_B...`)."""
    return ".lora_A." in name or ".lora_B." in name


def adapter_tensors(
    state: dict[str, torch.Tensor], adapter: str = "default"
) -> dict[str, torch.Tensor]:
    """The adapter matrices of a peft state dict under peft's saved names (pure).

    Args:
        state: peft model (state-dict) tensors; only `...lora_A.<adapter>.weight` [r, in] and
            `...lora_B.<adapter>.weight` [out, r] are kept.
        adapter: the adapter name (dropped from the keys, as `save_pretrained` does).

    Returns:
        `{base_model.model.<module>.lora_A.weight: [r, in], ....lora_B.weight: [out, r]}`, the
        keys of `adapter_model.safetensors` that vLLM and peft load.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not is_adapter_key(key):
            continue
        for ab in ("lora_A", "lora_B"):
            key = key.replace(f".{ab}.{adapter}.", f".{ab}.")
        out[key] = tensor
    return out


def adapter_config(module: Any) -> dict[str, Any]:
    """The active adapter's `adapter_config.json` content (JSON-ready, as peft writes it)."""
    config = module.peft_config[module.active_adapter].to_dict()
    config["inference_mode"] = True  # as `save_pretrained` writes it
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def base_model(module: Any) -> Any:
    """The wrapped transformers model of a peft model (the module itself otherwise)."""
    return module.get_base_model() if is_peft(module) else module
