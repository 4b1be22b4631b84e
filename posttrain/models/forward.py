"""No-grad forward passes of the policy: per-token log-probs and entropies (for logp_old,
the reference's logp_ref, and the RENT entropy column)."""

from __future__ import annotations

from typing import Any

import torch

from posttrain import losses
from posttrain.data.tensors import chunk_indices, pad_right
from posttrain.rollout.engine import Rollout
from posttrain.runtime import distributed as dist


@torch.no_grad()
def policy_token_stats(
    model: Any,
    t: dict[str, torch.Tensor],
    temperature: float,
    micro_size: int,
    ref_model: Any | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token log-probs and entropies of the current policy (and the reference), without grad.

    Args:
        model: the trained policy (DeepSpeed engine or causal LM), as it is now.
        t: `input_ids`, `attention_mask` [N, L].
        temperature: the sampler's temperature (logits are divided by it).
        micro_size: rows per forward pass.
        ref_model: frozen reference model, or None.

    Returns:
        `logp_old`, `entropy_old` (and `logp_ref` with a reference): [N, L-1] float32 on the CPU,
        aligned with the next-token targets `input_ids[:, 1:]`.
    """
    device = dist.device()
    olds, ents, refs = [], [], []
    for idx in chunk_indices(t["input_ids"].shape[0], micro_size):
        ids, att = t["input_ids"][idx].to(device), t["attention_mask"][idx].to(device)
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        olds.append(losses.token_logprobs(logits, ids[:, 1:], temperature).cpu())
        ents.append(losses.token_entropy(logits, temperature).cpu())
        if ref_model is not None:
            ref_logits = ref_model(input_ids=ids, attention_mask=att).logits[:, :-1]
            refs.append(losses.token_logprobs(ref_logits, ids[:, 1:], temperature).cpu())
    out = {"logp_old": torch.cat(olds), "entropy_old": torch.cat(ents)}
    if refs:
        out["logp_ref"] = torch.cat(refs)
    return out


def completion_entropy(
    model: Any, rollouts: list[Rollout], pad_id: int, temperature: float, micro_size: int
) -> list[float | None]:
    """Each completion's mean token entropy under the current policy (RENT), without grad.

    Args:
        model: the trained policy at the start of the step (the `logp_old` policy).
        rollouts: N sampled completions.
        pad_id: padding token id.
        temperature: the sampler's temperature.
        micro_size: rows per forward pass.

    Returns:
        [N] mean_t H_{i,t} over the completion tokens (the distributions each completion token was
        sampled from); None for an empty completion.
    """
    ids = [r.prompt_ids + r.completion_ids for r in rollouts]
    t = {
        "input_ids": pad_right(ids, pad_id, torch.long),
        "attention_mask": pad_right([[1] * len(x) for x in ids], 0, torch.long),
    }
    entropy = policy_token_stats(model, t, temperature, micro_size)["entropy_old"]  # [N, L-1]
    out: list[float | None] = []
    for i, r in enumerate(rollouts):
        start, n = len(r.prompt_ids) - 1, len(r.completion_ids)
        out.append(float(entropy[i, start : start + n].mean()) if n else None)
    return out
