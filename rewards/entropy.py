"""Intrinsic rewards computed from the policy itself (no answer needed).

RENT (Prabhudesai et al. 2025, "Maximizing Confidence Alone Improves Reasoning"): the reward of a
completion is its negative mean token entropy under the policy that sampled it,
R_i = -mean_t H_{i,t}. The entropy is not computable from text, so the sampling algorithms
(`grpo`, `rebel`) run the trainer's model over each completion and pass the per-sample mean as
the `token_entropy` column (see `posttrain.rollout.source.completion_entropy`).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["neg_entropy"]


def neg_entropy(
    prompts: list[str], completions: list[str], token_entropy: list[float | None], **_: Any
) -> list[float | None]:
    """-mean_t H_{i,t}: higher when the policy is more confident over the completion.

    Args:
        prompts: [N] prompts (unused).
        completions: [N] completions (unused; the entropy was computed from their tokens).
        token_entropy: [N] each completion's mean token entropy under the policy (nats), None
            where it could not be computed (an empty completion): that sample gets None.

    Returns:
        [N] rewards -token_entropy[i] (None where the entropy is None or not finite).
    """
    if len(token_entropy) != len(completions):
        raise ValueError(
            f"neg_entropy: {len(token_entropy)} token_entropy values for "
            f"{len(completions)} completions"
        )
    return [-float(h) if h is not None and math.isfinite(float(h)) else None for h in token_entropy]
