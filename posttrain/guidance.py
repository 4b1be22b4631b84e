"""Guide (adaptive guidance, Nath et al. 2025): the pure parts (formulas: docs/algorithms.md,
"Guide (adaptive guidance)").

For a group whose G samples all fail, the rollout source samples `replace` completions again
with a hint in the prompt and puts them into the group in place of failed samples; the trainer
trains each hinted completion y as a completion of the UNHINTED prompt x, with the ratio

    r_t = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, h, y_<t)

(the denominator is the behaviour policy: the step-start policy in the hinted context the
completion was sampled from). This module holds the pieces without a model, a config object or
I/O: which groups all fail, which samples a hinted one replaces, the built-in hint functions and
the hint template, and the log-prob bookkeeping that makes `logp_old` the hinted-context one.

Shapes: P groups, G samples per group, k hinted samples per all-fail group, N training rows,
T token positions (aligned with the next-token targets `input_ids[:, 1:]`).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

# The placeholders of `guide.hint_template`: the row's prompt text and its hint.
TEMPLATE_FIELDS = ("prompt", "hint")

T = TypeVar("T")


# ------------------------------------------------------------------------------ hints
def _integer_answer(row: dict[str, Any], fn: str) -> int:
    try:
        return int(str(row["answer"]).strip())
    except (KeyError, ValueError):
        raise ValueError(
            f"hint function {fn} needs an integer 'answer' column, got {row.get('answer')!r}"
        ) from None


def arithmetic_tens(row: dict[str, Any]) -> str:
    """The tens digit of an integer answer ("52" -> "the tens digit is 5"); a one-digit answer
    gets "the answer has one digit", and a negative one is said to be negative first."""
    value = _integer_answer(row, "arithmetic_tens")
    sign = "the answer is negative; " if value < 0 else ""
    if abs(value) < 10:
        return f"{sign}the answer has one digit"
    return f"{sign}the tens digit is {abs(value) // 10 % 10}"


def answer_first_char(row: dict[str, Any]) -> str:
    """The first character of the `answer` column ("52" -> "the answer starts with 5"). For an
    answer of one character this gives the answer away."""
    answer = str(row.get("answer", "")).strip()
    if not answer:
        raise ValueError(f"hint function answer_first_char needs an 'answer' column, got {row!r}")
    return f"the answer starts with {answer[0]}"


# `guide.hint_fn`: name -> row -> hint text (raises ValueError naming what the row lacks)
HINT_FUNCTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "arithmetic_tens": arithmetic_tens,
    "answer_first_char": answer_first_char,
}


def template_fields(template: str) -> list[str]:
    """The `{name}` placeholders of a `str.format` template, in order (`{{`/`}}` are literal).

    Raises:
        ValueError: the template is not a valid format string (e.g. an unmatched brace).
    """
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def render_hint(template: str, prompt: str, hint: str) -> str:
    """`template` with `{prompt}` and `{hint}` filled in (braces in prompt and hint stay as is).

    >>> render_hint("{prompt}\\nHint: {hint}", "07+45", "the tens digit is 5")
    '07+45\\nHint: the tens digit is 5'
    """
    return template.format(prompt=prompt, hint=hint)


def hinted_prompt(prompt: str | Sequence[dict[str, Any]], template: str, hint: str) -> Any:
    """The prompt with its hint: a text prompt through `render_hint`; a list of chat messages
    with its last user message's content rendered (the other messages unchanged)."""
    if isinstance(prompt, str):
        return render_hint(template, prompt, hint)
    messages = [dict(m) for m in prompt]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ValueError("a chat prompt without a user message cannot take a hint")
    last = messages[users[-1]]
    last["content"] = render_hint(template, str(last["content"]), hint)
    return messages


def spread_indices(n: int, share: float) -> list[int]:
    """floor(n * share) of the indices 0..n-1, spread evenly: i is chosen when
    floor((i + 1) * share) > floor(i * share) (share 0.5 -> 1, 3, 5, ...; 1 -> all).

    Raises:
        ValueError: share outside [0, 1].
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    return [i for i in range(n) if int((i + 1) * share) > int(i * share)]


# ------------------------------------------------------------------------------ groups
def all_fail_groups(rewards: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """Which groups have no successful sample: success = valid and reward >= threshold.

    Args:
        rewards: [P, G] rewards, NaN where unknown (a NaN never succeeds).
        valid: [P, G] bool, the samples that count in the loss.
        threshold: the success threshold (`guide.success_threshold`).

    Returns:
        [P] bool, True for a group whose samples all fail.
    """
    success = valid.bool() & (rewards >= threshold)
    return ~success.any(dim=-1)


def replacement_slots(rewards: Tensor, valid: Tensor, k: int) -> Tensor:
    """The k samples of each group that hinted samples replace: invalid samples first, then the
    lowest rewards (NaN counts as lowest), ties broken by position (the earlier first).

    Args:
        rewards: [P, G] rewards, NaN where unknown.
        valid: [P, G] bool.
        k: 1 <= k <= G.

    Returns:
        [P, k] long positions within each group, in replacement order.
    """
    G = rewards.shape[-1]
    if not 1 <= k <= G:
        raise ValueError(f"k={k} hinted samples cannot replace samples of a group of {G}")
    score = torch.where(valid.bool() & ~torch.isnan(rewards), rewards.double(), -torch.inf)
    return torch.argsort(score, dim=-1, stable=True)[..., :k]


def replace_samples(group: Sequence[T], hinted: Sequence[T], slots: Sequence[int]) -> list[T]:
    """A copy of `group` with `hinted[j]` at position `slots[j]` (the rest unchanged).

    Args:
        group: the G samples of a group.
        hinted: k samples to put in.
        slots: k distinct positions in [0, G).
    """
    if len(hinted) != len(slots) or len(set(slots)) != len(slots):
        raise ValueError(f"{len(hinted)} hinted samples need as many distinct slots, got {slots}")
    out = list(group)
    for slot, sample in zip(slots, hinted, strict=True):
        out[int(slot)] = sample
    return out


# ------------------------------------------------------------------------------ log-probs
def realign_completion_logps(
    src: Tensor, src_start: Tensor, dst_start: Tensor, lengths: Tensor, width: int
) -> Tensor:
    """Move each row's completion log-probs from one prompt layout to another.

    Row i's completion log-probs sit at `src[i, src_start[i] : src_start[i] + lengths[i]]` (a
    forward pass over hinted prompt + completion: src_start = len(hinted prompt) - 1); the
    result holds them at `[dst_start[i], dst_start[i] + lengths[i])` of a row of `width`
    positions (the training row: unhinted prompt + completion), 0 elsewhere.

    Args:
        src: [N, S] per-target log-probs.
        src_start, dst_start, lengths: [N] long.
        width: T, the destination width.

    Returns:
        [N, T] float32.
    """
    pos = torch.arange(width).unsqueeze(0)  # [1, T]
    inside = (pos >= dst_start.unsqueeze(1)) & (pos < (dst_start + lengths).unsqueeze(1))
    index = (pos - dst_start.unsqueeze(1) + src_start.unsqueeze(1)).clamp(0, src.shape[1] - 1)
    picked = src.float().gather(1, index)
    return torch.where(inside, picked, torch.zeros((), dtype=picked.dtype))


def behaviour_logp_old(logp_old: Tensor, hinted_logp_old: Tensor, hinted: Tensor) -> Tensor:
    """The `logp_old` the surrogate divides by: the hinted-context log-probs on hinted rows
    (log pi_old(y_t | x, h, y_<t)), the usual step-start log-probs (log pi_old(y_t | x, y_<t))
    on the others.

    Args:
        logp_old: [N, T] step-start log-probs with the unhinted prompt.
        hinted_logp_old: [N, T] step-start log-probs in the context each row was sampled in
            (`realign_completion_logps` of a pass over hinted prompt + completion).
        hinted: [N] bool, the rows sampled with a hint.

    Returns:
        [N, T] float32.
    """
    return torch.where(hinted.bool().unsqueeze(1), hinted_logp_old.float(), logp_old.float())
