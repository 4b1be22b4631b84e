"""Loading models and tokenizers: policy (trainable), reference (frozen), from a local
save_pretrained directory or a hub name, with one clear error for a bad path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.models import vlm

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_path(path: str | Path, what: str = "model.path") -> str:
    """Check a local model dir (must hold config.json); pass hub ids through unchanged.

    Raises:
        ConfigError: naming `what` and the path, when a local path is missing, is a file, lacks
            config.json, or the string cannot be a hub name.
    """
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{what} {str(p)!r} is a file; expected a model directory")
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"{what} {str(p)!r} has no config.json; expected a directory written by "
                "save_pretrained (or `posttrain make-tiny`)"
            )
        return str(p)
    text = str(path)
    if text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise ConfigError(
            f"{what} {text!r} does not exist; expected a model directory with config.json "
            "or a hub name like 'Qwen/Qwen2.5-0.5B'"
        )
    return text


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r}: valid values are {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(path: str | Path) -> Any:
    """Load a tokenizer with AutoTokenizer; pad token falls back to EOS when missing.

    Raises:
        ConfigError: a bad path, a tokenizer that does not load, or one without pad and EOS tokens.
    """
    from transformers import AutoTokenizer

    name = resolve_model_path(path, "tokenizer path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise ConfigError(f"tokenizer path {name!r} could not be loaded: {exc}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"tokenizer of {name!r} has no pad token and no EOS token; set eos_token (and "
                "pad_token) in its tokenizer_config.json, e.g. the token that ends a chat turn"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if vlm.is_vlm(name):  # the image processor rides along (prompts, checkpoints)
        vlm.attach_processor(tokenizer, vlm.load_processor(name))
    return tokenizer


def _load_causal_lm(path: str | Path, dtype: str | torch.dtype, what: str) -> Any:
    from transformers import AutoModelForCausalLM

    name = resolve_model_path(path, what)
    if vlm.is_vlm(name):
        return vlm.load_vlm(name, _torch_dtype(dtype), what)
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=_torch_dtype(dtype))
    except OSError as exc:
        raise ConfigError(f"{what} {name!r} could not be loaded: {exc}") from exc


def load_policy(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    gradient_checkpointing: bool = False,
    lora: Any = None,
    freeze_vision: bool = True,
) -> Any:
    """Load the trainable policy (AutoModelForCausalLM, or a VLM: `models/vlm.py`) in train mode.

    Args:
        path: local model directory (with config.json) or hub name.
        dtype: "float32" | "bfloat16" | "float16" (or a torch.dtype).
        gradient_checkpointing: enable non-reentrant activation checkpointing (disables KV cache).
        lora: a `LoRAConfig` (`model.lora`); with r > 0 the model is wrapped by peft
            (`posttrain.runtime.lora.apply_lora`) and only the adapter weights require grad
            (of a VLM's language model only).
        freeze_vision: a VLM's vision tower gets requires_grad False (`model.freeze_vision`).
    """
    model = _load_causal_lm(path, dtype, "model.path")
    vision = hasattr(model.config, "vision_config")
    if vision and freeze_vision:
        vlm.freeze_vision(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora is not None and lora.r > 0:
        from posttrain.runtime.lora import apply_lora

        model = apply_lora(model, vlm.language_lora(model, lora) if vision else lora)
    model.train()
    return model


def load_reference(path: str | Path, dtype: str | torch.dtype = "float32") -> Any:
    """Load a frozen reference model: eval mode, every parameter has requires_grad=False."""
    model = _load_causal_lm(path, dtype, "model.ref_path")
    model.eval()
    model.requires_grad_(False)
    return model
