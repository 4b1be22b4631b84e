"""Preference pairs (prompt, chosen, rejected): normalising, checking, tokenizing.

A row holds a prompt and two completions, each a string or a chat message list:

    {"prompt": "12+7", "chosen": "19", "rejected": "18"}
    {"prompt": [{"role": "user", "content": "hi"}],
     "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [...]}
    {"chosen": [user msg, assistant msg], "rejected": [user msg, other assistant msg]}

In the last form the prompt is the messages the two lists share (an "implicit prompt"; the
loader fills it in as the prompt column when the rows have none, data/formats.py; pointing
`data.prompt_column` at the chosen column works too). After the prompt, each completion must be
exactly one assistant message (Anthropic HH / UltraFeedback-binarized rows load as they come).
Tokenization matches SFT and the rollout engine: the chat-templated prompt (with the generation
header), then the completion tokens and the EOS token; the response mask is 1 on the completion
tokens and the EOS.

Bad rows (no `rejected`, chosen == rejected, an empty completion, longer than `max_length`...) are
listed with their row index and either dropped (and counted) or raised as a ConfigError.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.data.arithmetic import wrong_answer
from posttrain.data.chat import encode_sft
from posttrain.data.formats import implicit_prompt
from posttrain.errors import ConfigError

logger = logging.getLogger("posttrain.data")

BAD_ROW_POLICIES = ("drop", "error")
_MAX_LISTED = 10


@dataclass(frozen=True)
class PreferencePair:
    """One normalised preference pair.

    Attributes:
        index: row index in the source rows (for messages about the row).
        prompt: user text or a list of chat messages.
        chosen: text of the preferred completion.
        rejected: text of the dispreferred completion.
        margin: optional reward-model margin (0.0 when the dataset has none).
    """

    index: int
    prompt: str | tuple[dict[str, Any], ...]
    chosen: str
    rejected: str
    margin: float = 0.0


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of a pair; masks are 1 on response tokens (completion + EOS), not shifted.

    Attributes:
        index: row index in the source rows.
        chosen_ids, chosen_mask: [Lw] ids and response mask of prompt + chosen.
        rejected_ids, rejected_mask: [Ll] ids and response mask of prompt + rejected.
        margin: reward-model margin.
    """

    index: int
    chosen_ids: tuple[int, ...]
    chosen_mask: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    rejected_mask: tuple[int, ...]
    margin: float = 0.0


def arithmetic_pairs(
    rows: Sequence[dict[str, Any]], seed: int, negatives: int = 1, kind: str = "plausible"
) -> list[dict[str, Any]]:
    """Synthetic preference rows: chosen = the correct answer, rejected = a wrong one.

    Args:
        rows: arithmetic rows `{"prompt": "37+45", "answer": "82"}`.
        seed: the wrong answers of a row depend only on (seed, prompt), not on row order.
        negatives: distinct wrong answers per prompt (one pair each, adjacent).
        kind: "plausible" (`arithmetic.wrong_answer`: off by 1/2/10, sign or operator
            mistakes: hard negatives), "uniform" (any other integer in the range of the rows'
            correct answers, each equally likely) or "mixed" (negatives alternate: plausible,
            uniform, plausible, ...).

    Returns:
        Rows `{"prompt", "answer", "chosen", "rejected"}`.

    Raises:
        ValueError: unknown kind, or the rows' answers span fewer than `negatives` + 1 values.
    """
    if kind not in ("plausible", "uniform", "mixed"):
        raise ValueError(f"wrong-answer kind {kind!r}: use 'plausible', 'uniform' or 'mixed'")
    answers = [int(row["answer"]) for row in rows]
    lo, hi = (min(answers), max(answers)) if answers else (0, 0)
    if kind != "plausible" and rows and hi - lo < negatives:
        raise ValueError(f"uniform wrong answers: the answers span only {lo}..{hi}")
    out = []
    for row in rows:
        rng = random.Random(f"preference:{seed}:{row['prompt']}")
        wrong: list[str] = []
        for _ in range(50 * negatives):
            if len(wrong) == negatives:
                break
            if kind == "plausible" or (kind == "mixed" and len(wrong) % 2 == 0):
                w = wrong_answer(row, rng)
            else:
                w = str(rng.randint(lo, hi))
            if w not in wrong and w != str(row["answer"]):
                wrong.append(w)
        out.extend({**row, "chosen": str(row["answer"]), "rejected": w} for w in wrong)
    return out


def _is_messages(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(m, dict) for m in value)


def _completion_text(prompt: Any, value: Any, side: str) -> str:
    """The completion text of one side; raises ValueError with the reason for a bad row."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not _is_messages(value):
        raise ValueError(f"'{side}' must be a string or a list of chat messages")
    msgs = [dict(m) for m in value]
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if len(msgs) > len(head) and msgs[: len(head)] == head:
        msgs = msgs[len(head) :]
    if len(msgs) != 1 or msgs[0].get("role") != "assistant":
        raise ValueError(f"'{side}' must be exactly one assistant message after the prompt")
    content = msgs[0].get("content")
    if not isinstance(content, str):
        raise ValueError(f"'{side}' assistant message has no text content")
    return content


def _normalize_row(
    i: int, row: dict[str, Any], cols: tuple[str, str, str, str | None]
) -> PreferencePair:
    prompt_col, chosen_col, rejected_col, margin_col = cols
    for col in (chosen_col, rejected_col):
        if row.get(col) is None:
            raise ValueError(f"missing '{col}'")
    # conversation-only datasets point data.prompt_column at the chosen column (load_rows needs
    # a prompt column): the prompt is then the messages both conversations share
    prompt = None if prompt_col in (chosen_col, rejected_col) else row.get(prompt_col)
    if prompt is None:
        prompt = implicit_prompt(row[chosen_col], row[rejected_col])
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise ValueError(f"missing or empty '{prompt_col}'")
    if not isinstance(prompt, str) and not _is_messages(prompt):
        raise ValueError(f"'{prompt_col}' must be a string or a list of chat messages")
    chosen = _completion_text(prompt, row[chosen_col], chosen_col)
    rejected = _completion_text(prompt, row[rejected_col], rejected_col)
    if not chosen.strip():
        raise ValueError(f"empty '{chosen_col}' completion")
    if not rejected.strip():
        raise ValueError(f"empty '{rejected_col}' completion")
    if chosen == rejected:
        raise ValueError(f"'{chosen_col}' == '{rejected_col}'")
    margin = 0.0
    if margin_col is not None:
        value = row.get(margin_col)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"'{margin_col}' must be a number, got {value!r}")
        margin = float(value)
    frozen = prompt if isinstance(prompt, str) else tuple(dict(m) for m in prompt)
    return PreferencePair(i, frozen, chosen, rejected, margin)


def normalize_pairs(
    rows: Sequence[dict[str, Any]],
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    margin_column: str | None = None,
) -> tuple[list[PreferencePair], list[tuple[int, str]]]:
    """Turn rows into pairs; returns (good pairs, [(row index, reason)] of bad rows)."""
    cols = (prompt_column, chosen_column, rejected_column, margin_column)
    good, bad = [], []
    for i, row in enumerate(rows):
        try:
            good.append(_normalize_row(i, row, cols))
        except ValueError as err:
            bad.append((i, str(err)))
    return good, bad


def encode_pairs(
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    *,
    max_length: int,
    system_prompt: str | None = None,
) -> tuple[list[EncodedPair], list[tuple[int, str]]]:
    """Tokenize pairs; a pair whose chosen or rejected sequence exceeds `max_length` is bad.

    Returns:
        (encoded pairs, [(row index, reason)] of pairs that are too long).
    """
    good, bad = [], []
    for p in pairs:
        prompt = p.prompt if isinstance(p.prompt, str) else list(p.prompt)
        w_ids, w_mask = encode_sft(tokenizer, prompt, p.chosen, system_prompt)
        l_ids, l_mask = encode_sft(tokenizer, prompt, p.rejected, system_prompt)
        longest = max(len(w_ids), len(l_ids))
        if longest > max_length:
            bad.append((p.index, f"too long: {longest} tokens > max_length={max_length}"))
            continue
        good.append(
            EncodedPair(p.index, tuple(w_ids), tuple(w_mask), tuple(l_ids), tuple(l_mask), p.margin)
        )
    return good, bad


def handle_bad_rows(bad: list[tuple[int, str]], policy: str, section: str, split: str) -> int:
    """Apply the `bad_rows` policy: `error` raises ConfigError, `drop` logs and returns the count.

    Args:
        bad: (row index, reason) of every bad row.
        policy: `drop` or `error`.
        section: config section for messages (`dpo`, `reward_model`).
        split: which data (`train`, `held-out`) for messages.
    """
    if policy not in BAD_ROW_POLICIES:
        raise ConfigError(f"{section}.bad_rows={policy!r}: use one of {BAD_ROW_POLICIES}")
    if not bad:
        return 0
    shown = "; ".join(f"row {i}: {why}" for i, why in bad[:_MAX_LISTED])
    more = f" (and {len(bad) - _MAX_LISTED} more)" if len(bad) > _MAX_LISTED else ""
    if policy == "error":
        raise ConfigError(
            f"{section}: {len(bad)} bad preference row(s) in the {split} data: {shown}{more}; "
            f"fix them or set {section}.bad_rows=drop"
        )
    logger.warning(
        "%s: dropped %d bad preference row(s) from the %s data: %s%s",
        section,
        len(bad),
        split,
        shown,
        more,
    )
    return len(bad)


def build_pairs(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    columns: tuple[str, str, str, str | None],
    max_length: int,
    bad_rows: str,
    section: str,
    split: str,
    system_prompt: str | None = None,
) -> tuple[list[EncodedPair], int]:
    """Rows -> encoded pairs, applying the bad-row policy.

    Args:
        rows: dataset rows.
        tokenizer: chat-template tokenizer.
        columns: (prompt, chosen, rejected, margin or None) column names.
        max_length: longest allowed sequence (prompt + completion + EOS) in tokens.
        bad_rows: `drop` or `error`.
        section: config section for messages (`dpo`, `reward_model`).
        split: which data for messages (`train`, `held-out`).
        system_prompt: optional system message for every prompt.

    Returns:
        (encoded pairs, number of dropped rows).

    Raises:
        ConfigError: a bad row with `bad_rows=error`, or no usable pair at all.
    """
    prompt_col, chosen_col, rejected_col, margin_col = columns
    pairs, bad = normalize_pairs(
        rows,
        prompt_column=prompt_col,
        chosen_column=chosen_col,
        rejected_column=rejected_col,
        margin_column=margin_col,
    )
    encoded, too_long = encode_pairs(
        tokenizer, pairs, max_length=max_length, system_prompt=system_prompt
    )
    bad = sorted(bad + too_long)
    if not encoded and rows and bad_rows == "drop":  # one error, not a warning about the drop
        shown = "; ".join(f"row {i}: {why}" for i, why in bad[:3])
        raise ConfigError(
            f"{section}: none of the {len(rows)} {split} rows is a usable preference pair "
            f"({shown}{' ...' if len(bad) > 3 else ''})"
        )
    return encoded, handle_bad_rows(bad, bad_rows, section, split)


def _pad(seqs: Sequence[Sequence[float]], value: float, dtype: torch.dtype) -> torch.Tensor:
    width = max(1, max((len(s) for s in seqs), default=0))
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.tensor(list(s), dtype=dtype)
    return out


def pair_batch(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors for one forward over m pairs: rows 0..m-1 are chosen, rows m..2m-1 rejected.

    Args:
        pairs: m encoded pairs.
        pad_id: pad token id (right padding).

    Returns:
        `input_ids` [2m, W] long, `attention_mask` [2m, W] long, `mask` [2m, W - 1] float
        (response tokens as targets: mask[:, t] is 1 when token t + 1 is a response token),
        `margin` [m] float. W is the longest of the 2m sequences.
    """
    ids = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    masks = [p.chosen_mask[1:] for p in pairs] + [p.rejected_mask[1:] for p in pairs]
    input_ids = _pad(ids, pad_id, torch.long)
    width = input_ids.shape[1]
    return {
        "input_ids": input_ids,
        "attention_mask": _pad([[1] * len(x) for x in ids], 0, torch.long),
        "mask": _pad(masks, 0, torch.float)[:, : width - 1],
        "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float),
    }
