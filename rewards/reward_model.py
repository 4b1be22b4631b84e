"""`reward_model`: score completions with a trained Bradley-Terry reward model checkpoint.

    rewards:
      - name: reward_model
        kwargs: {path: runs/rm_tiny/checkpoints/final, batch_size: 32}

The checkpoint (a `train.algorithm: reward_model` run's `checkpoints/final`, or any
`AutoModelForSequenceClassification` with one label and a chat-template tokenizer) is loaded once
per (path, device) and cached. Each prompt is rendered with the tokenizer's chat template exactly
as in training (generation header, then the completion and the EOS token) and scored in batches;
the scalar is read at the last non-pad token.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

_CACHE: dict[str, tuple[Any, Any]] = {}
_LOCK = threading.Lock()


def load_scorer(path: str) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for `path`, loaded once and cached."""
    key = str(Path(path).expanduser().resolve()) if Path(path).exists() else str(path)
    with _LOCK:
        if key not in _CACHE:
            from transformers import AutoModelForSequenceClassification

            from posttrain.models import load_tokenizer, resolve_model_path

            name = resolve_model_path(path, "reward_model path")
            tokenizer = load_tokenizer(name)
            model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = int(tokenizer.pad_token_id)
            model.eval().requires_grad_(False)
            _CACHE[key] = (model, tokenizer)
        return _CACHE[key]


def clear_cache() -> None:
    """Forget every loaded reward model."""
    with _LOCK:
        _CACHE.clear()


def reward_model(
    prompts: list[Any],
    completions: list[str],
    *,
    path: str,
    batch_size: int = 32,
    system_prompt: str | None = None,
    **columns: Any,
) -> list[float]:
    """Scalar reward-model scores of (prompt, completion) pairs.

    Args:
        prompts: N prompts (user text or chat message lists), as in the dataset.
        completions: N completion texts.
        path: reward-model checkpoint directory.
        batch_size: sequences per forward pass.
        system_prompt: system message used when the model was trained (data.system_prompt).
        **columns: other dataset columns (unused).

    Returns:
        N floats.
    """
    from posttrain.data.chat import encode_sft

    if batch_size < 1:
        raise ValueError(f"reward_model: batch_size must be >= 1, got {batch_size}")
    model, tokenizer = load_scorer(path)
    pad = int(model.config.pad_token_id)
    seqs = [
        encode_sft(tokenizer, p, c, system_prompt)[0]
        for p, c in zip(prompts, completions, strict=True)
    ]
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
                att[i, : len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
            out.extend(float(x) for x in logits.float().reshape(-1).cpu())
    return out
