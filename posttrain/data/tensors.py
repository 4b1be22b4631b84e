"""Plain list/tensor helpers for batching: right padding, chunking, token-budget groups, a rank's
shard."""

from __future__ import annotations

import torch


def pad_right(seqs: list[list[int]], pad: int | float, dtype: torch.dtype) -> torch.Tensor:
    """Stack variable-length lists into [N, max_len], padding on the right."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), max(width, 1)), pad, dtype=dtype)
    for i, s in enumerate(seqs):
        if s:
            out[i, : len(s)] = torch.tensor(s, dtype=dtype)
    return out


def chunk_indices(n: int, size: int) -> list[list[int]]:
    """Split range(n) into consecutive chunks of at most `size`."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def shard_for_rank(n: int, rank: int, world: int) -> list[int]:
    """Contiguous indices of `n` samples owned by `rank` (n must divide evenly)."""
    if n % world:
        raise ValueError(f"{n} samples cannot be split evenly over {world} ranks")
    per = n // world
    return list(range(rank * per, (rank + 1) * per))


def token_budget_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group row indices into micro-batches whose padded size stays within a token budget.

    Rows are taken longest first (ties keep their order) and packed greedily: a row joins the
    current group while (rows + 1) x (longest row) <= `max_tokens`; a row longer than the budget
    goes alone. On length-sorted rows consecutive packing is the fewest groups any contiguous
    split achieves, and each group pads to nearly its own rows' length.

    Args:
        lengths: [N] each row's length in tokens (its right padding trimmed).
        max_tokens: the budget: rows x longest row of a group.

    Returns:
        The groups' row indices (every index in exactly one group, longest rows first).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        if current and (len(current) + 1) * max(width, lengths[i]) > max_tokens:
            groups.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, lengths[i])
    if current:
        groups.append(current)
    return groups
