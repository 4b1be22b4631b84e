"""Plain list/tensor helpers for batching: right padding, chunking, a rank's shard."""

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
