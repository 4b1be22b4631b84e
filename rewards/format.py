"""Format rewards: bare integer, think/answer tags, length bounds, regex match (1.0 / 0.0)."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["format_number", "length_in_range", "regex_match", "think_answer_format"]

_INTEGER_RE = re.compile(r"\s*-?\d+\s*")
_THINK_ANSWER_RE = re.compile(
    r"\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*"
    r"<answer>(?:(?!</?think>|</?answer>).)*\S(?:(?!</?think>|</?answer>).)*</answer>\s*",
    re.DOTALL,
)


def format_number(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 if the completion is just an integer (optional ``-``, whitespace around), else 0.0."""
    return [1.0 if _INTEGER_RE.fullmatch(c) else 0.0 for c in completions]


def think_answer_format(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 if the completion is ``<think>...</think><answer>...</answer>`` and nothing else.

    Exactly one think block followed by one non-empty answer block, whitespace around them only.
    When the prompt already ends with ``<think>`` (R1-style templates), the completion may start
    inside the think block, so the opening tag is not required of it.
    """
    scores: list[float] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        text = completion
        if prompt.rstrip().endswith("<think>") and not completion.lstrip().startswith("<think>"):
            text = "<think>" + completion
        scores.append(1.0 if _THINK_ANSWER_RE.fullmatch(text) else 0.0)
    return scores


def length_in_range(
    prompts: list[str],
    completions: list[str],
    min_chars: int = 0,
    max_chars: int | None = None,
    **_: Any,
) -> list[float]:
    """1.0 if ``min_chars <= len(completion.strip()) <= max_chars`` (``None`` = unbounded)."""
    if max_chars is not None and max_chars < min_chars:
        raise ValueError(f"length_in_range: max_chars={max_chars} < min_chars={min_chars}")
    out: list[float] = []
    for c in completions:
        n = len(c.strip())
        out.append(1.0 if n >= min_chars and (max_chars is None or n <= max_chars) else 0.0)
    return out


def regex_match(
    prompts: list[str],
    completions: list[str],
    pattern: str | list[str],
    fullmatch: bool = False,
    flags: int = 0,
    **_: Any,
) -> list[float]:
    """1.0 if ``pattern`` matches the completion (``re.search``; whole string if ``fullmatch``).

    Args:
        pattern: One regex for all samples (kwarg) or [N] regexes (dataset column).
        fullmatch: Require the whole completion (stripped) to match.
        flags: ``re`` flags, e.g. ``re.IGNORECASE | re.DOTALL``.
    """
    patterns = pattern if isinstance(pattern, list) else [pattern] * len(completions)
    cache: dict[str, re.Pattern[str]] = {}
    out: list[float] = []
    for p, c in zip(patterns, completions, strict=True):
        if p not in cache:
            try:
                cache[p] = re.compile(p, flags)
            except re.error as e:
                raise ValueError(f"regex_match: invalid pattern {p!r}: {e}") from e
        rx = cache[p]
        hit = rx.fullmatch(c.strip()) if fullmatch else rx.search(c)
        out.append(1.0 if hit else 0.0)
    return out
