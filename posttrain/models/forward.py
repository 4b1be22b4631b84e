"""No-grad forward passes of the policy: per-token log-probs and entropies (logp_old, the
reference's logp_ref, and the token entropies of the RENT reward column)."""

from __future__ import annotations

from typing import Any

import torch

from posttrain.data.tensors import chunk_indices
from posttrain.models.lean_logprobs import lean_forward, output_token_stats
from posttrain.models.vlm import MM_COUNT_PREFIX, MM_PREFIX, image_model_inputs
from posttrain.runtime import distributed as dist


def rows_of(t: dict[str, torch.Tensor], idx: list[int]) -> dict[str, torch.Tensor]:
    """The image tensors (`mm.*`, `mm_count.*`) of rows `idx` of `t` ({} for text rows)."""
    keys = [k for k in t if k.startswith((MM_PREFIX, MM_COUNT_PREFIX))]
    return {k: t[k][idx] for k in keys}


@torch.no_grad()
def policy_token_stats(
    model: Any,
    t: dict[str, torch.Tensor],
    temperature: float,
    micro_size: int,
    ref_model: Any | None = None,
    policy: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-token log-probs and entropies of the current policy (and the reference), without grad.

    Args:
        model: the trained policy (DeepSpeed engine or causal LM), as it is now.
        t: `input_ids`, `attention_mask` [N, L]; a VLM's rows also their image tensors
            (`models.vlm.image_tensors`: `mm.<name>` [N, K, ...], `mm_count.<name>` [N]).
        temperature: the sampler's temperature (logits are divided by it).
            Models with lean-forward hooks (`lean_logprobs.install_lean_forward`) are run lean:
            no [rows, L, V] logits, chunked log-probs from the last hidden state.
        micro_size: rows per forward pass.
        ref_model: frozen reference model, or None.
        policy: run the policy (False: the reference only, e.g. a KL term with one update per
            batch, where the loss's detached current log-probs are the old ones).

    Returns:
        `logp_old`, `entropy_old` (with `policy`) and `logp_ref` (with a reference): [N, L-1]
        float32 on the CPU, aligned with the next-token targets `input_ids[:, 1:]`.
    """
    device = dist.device()
    olds, ents, refs = [], [], []
    for idx in chunk_indices(t["input_ids"].shape[0], micro_size):
        ids, att = t["input_ids"][idx].to(device), t["attention_mask"][idx].to(device)
        images = {k: v.to(device) for k, v in image_model_inputs(rows_of(t, idx)).items()}
        if policy:
            with lean_forward(model):
                out = model(input_ids=ids, attention_mask=att, **images)
            logp, entropy = output_token_stats(out, ids, temperature, entropy="metric")
            olds.append(logp.cpu())
            ents.append(entropy.cpu())
        if ref_model is not None:
            with lean_forward(ref_model):
                ref_out = ref_model(input_ids=ids, attention_mask=att, **images)
            refs.append(output_token_stats(ref_out, ids, temperature)[0].cpu())
    out = {"logp_old": torch.cat(olds), "entropy_old": torch.cat(ents)} if policy else {}
    if refs:
        out["logp_ref"] = torch.cat(refs)
    return out
