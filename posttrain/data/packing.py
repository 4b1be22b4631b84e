"""SFT samples -> model rows: conversation encoding, length grouping and packing.

Packing puts several samples into one row. Samples must not attend to each other, and each must
see the positions it would see alone, so a packed row carries

- `position_ids` [R, W] that restart at 0 for every sample, and
- a 4D block-diagonal causal `attention_mask` [R, 1, W, W] (bool, True = may attend).

Why a 4D mask and not position_ids alone: transformers 5.19 detects packed rows from
`position_ids` only when the 2D attention mask is None *and* there is no KV cache, but a Qwen2
forward in train mode builds a DynamicCache whenever `config.use_cache` is true (the default), so
on the sdpa path (CPU) position-id-only packing silently lets samples attend to each other. A 4D
mask is passed through unchanged by every sdpa/eager model (tests/unit/test_packing.py checks that
packed and unpacked per-token losses agree to 1e-5).

The loss mask of a packed row is the samples' shifted masks joined by a 0, so no token is ever
trained to predict the first token of the next sample.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

import torch

from posttrain.data.chat import to_messages
from posttrain.errors import ConfigError


def is_conversation(value: Any) -> bool:
    """True for a chat message list that holds at least one assistant message."""
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(m, dict) for m in value)
        and any(m.get("role") == "assistant" for m in value)
    )


def _render(
    tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, tools: Any = None
) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt
    )


def encode_messages(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    system_prompt: str | None = None,
    tools: Sequence[Any] | None = None,
) -> tuple[list[int], list[int]]:
    """Tokenize a whole conversation; the mask is 1 on every assistant reply (content + EOS).

    Each assistant turn k spans, in the rendered text, from the end of the conversation up to k
    rendered with the generation header, to the end of the turn's EOS token. Tokens are marked
    by their character offsets, so any tokenizer with offsets and a prefix-stable template works.

    Args:
        tokenizer: fast tokenizer with a chat template.
        messages: `{"role", "content"}` dicts, at least one with role `assistant`.
        system_prompt: prepended as a system message unless the conversation has one.
        tools: tool functions or JSON schemas rendered by the template (`tools=`), as a
            multi-turn environment's episodes are.

    Returns:
        (input_ids [L], mask [L]) with the mask not shifted.
    """
    msgs = to_messages(list(messages), system_prompt)
    eos = tokenizer.eos_token
    full = _render(tokenizer, msgs, False, tools)
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, msgs[:k], True, tools)
        turn = _render(tokenizer, msgs[: k + 1], False, tools)
        if not (full.startswith(head) and full.startswith(turn)):
            raise ConfigError(
                "the tokenizer's chat template is not prefix-stable (rendering the first turns "
                "does not give a prefix of the whole conversation); use prompt/completion rows"
            )
        end = turn.find(eos, len(head)) if eos else -1
        spans.append((len(head), end + len(eos) if end >= 0 else len(turn)))
    if not spans:
        raise ConfigError("conversation has no assistant message to train on")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), span_mask([s for s, _ in enc["offset_mapping"]], spans)


def span_mask(starts: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose first character lies in one of the spans, else 0.

    Args:
        starts: each token's start character offset.
        spans: half-open character ranges `[a, b)`, sorted and not overlapping (a conversation's
            assistant turns, in order).

    Returns:
        [len(starts)] 0/1 mask: `any(a <= s < b for a, b in spans)` per start `s`, found by
        bisection (one search per token instead of a scan of every span).
    """
    lefts = [a for a, _ in spans]
    out = []
    for s in starts:
        j = bisect_right(lefts, s) - 1
        out.append(int(j >= 0 and s < spans[j][1]))
    return out


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices sorted longest first (stable), for micro-batches of similar lengths."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing packing of sample lengths into rows of at most `capacity` tokens.

    Args:
        lengths: token count of each sample.
        capacity: tokens per row.

    Returns:
        Rows as lists of sample indices (each row keeps its samples in index order).

    Raises:
        ConfigError: a sample is longer than `capacity`.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in length_order(lengths):
        n = lengths[i]
        if n > capacity:
            raise ConfigError(
                f"SFT sample {i} has {n} tokens, more than sft.max_length={capacity}; "
                "raise sft.max_length"
            )
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return [sorted(b) for b in bins]


def packed_rows(
    ids: Sequence[Sequence[int]],
    shifted_masks: Sequence[Sequence[float]],
    bins: Sequence[Sequence[int]],
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Build packed tensors.

    Args:
        ids: N samples' token ids.
        shifted_masks: N target masks, each len(ids[i]) - 1 (1 where token t+1 is trained).
        bins: rows as lists of sample indices (from `pack_bins`).
        pad_id: pad token id.

    Returns:
        `input_ids` [R, W] long, `position_ids` [R, W] long, `attention_mask` [R, 1, W, W] bool
        (block-diagonal causal; trailing padding forms its own block), `mask` [R, W - 1] float,
        `num_tokens` [R] long (real tokens per row). W is the longest packed row.
    """
    width = max(sum(len(ids[i]) for i in b) for b in bins)
    R = len(bins)
    input_ids = torch.full((R, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, width), dtype=torch.long)
    segment = torch.full((R, width), -1, dtype=torch.long)
    mask = torch.zeros((R, max(width - 1, 1)), dtype=torch.float)
    num_tokens = torch.zeros(R, dtype=torch.long)
    for r, b in enumerate(bins):
        pos = 0
        for s, i in enumerate(b):
            n = len(ids[i])
            input_ids[r, pos : pos + n] = torch.tensor(ids[i], dtype=torch.long)
            position_ids[r, pos : pos + n] = torch.arange(n)
            segment[r, pos : pos + n] = s
            if n > 1:
                mask[r, pos : pos + n - 1] = torch.tensor(shifted_masks[i], dtype=torch.float)
            pos += n
        position_ids[r, pos:] = torch.arange(width - pos)
        num_tokens[r] = pos
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    attention = (same & causal).unsqueeze(1)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention,
        "mask": mask[:, : width - 1],
        "num_tokens": num_tokens,
    }
