"""Math answer rewards: answer extraction and equivalence checking.

``math_answer`` extracts the final answer from a completion (``\\boxed{}``, ``<answer>`` tags,
``#### x``, the last inline-math segment, the last number) and checks equivalence with the gold
``answer`` using math-verify (fractions, decimals, LaTeX, percentages, sets, intervals, ...).
A gold ``answer`` that is a whole reference solution is cut to its final answer first
(``reference_answer``): GSM8K's rationale ending in ``#### N`` gives ``N``, a MATH solution
gives its last ``\\boxed{}``.

``exact_answer`` is the fast path for the built-in arithmetic task: the last integer of the
completion equals the answer string (no sympy).

math-verify's own timeouts use ``signal.alarm``, which only works on the main thread; the reward
boundary runs rewards in worker threads and enforces its own timeout, so off the main thread we
pass ``parsing_timeout=None`` / ``timeout_seconds=None``.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

__all__ = [
    "exact_answer",
    "extract_answer",
    "extract_boxed",
    "is_equivalent",
    "last_integer",
    "math_answer",
    "reference_answer",
]

logger = logging.getLogger("posttrain.rewards")

_MAIN_THREAD_TIMEOUT_S = 5  # math-verify's signal-based timeout, used only on the main thread
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_SPACE_RE = re.compile(r"\\boxed\s+([^\s$]+)")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_HASHES_RE = re.compile(r"####\s*([^\n]*)")
_INLINE_MATH_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_NUMBER_RE = re.compile(
    r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?\s*%?|-?\.\d+%?"
)
_INT_RE = re.compile(r"-?\d+(?:\.\d+)?")
_DELIMS_RE = re.compile(r"(?<!\\)\$|\\boxed|\\\(|\\\[")
_PROSE_RE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}\s+[a-zA-Z]{2,}")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces balanced.

    Returns ``None`` when there is no complete boxed expression. ``\\boxed 5`` is also accepted.
    """
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            ch = text[i]
            if ch == "\\" and i + 1 < len(text):
                i += 2  # skip escaped char such as \{ or \}
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            i += 1
        if depth == 0:
            return text[start : i - 1].strip()
    spaced = _BOXED_SPACE_RE.findall(text)
    return spaced[-1] if spaced else None


def _last_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(text)
    return matches[-1].strip() if matches else None


def extract_answer(text: str) -> str | None:
    """Final answer string of a completion, or ``None``.

    Order: last ``\\boxed{}``; last ``<answer>...</answer>`` (its own boxed content if any);
    ``#### x`` (GSM8K style); last ``$...$`` / ``\\(...\\)`` segment; last number.
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG_RE.findall(text)
    if tags and tags[-1].strip():
        return tags[-1].strip()
    hashes = _HASHES_RE.findall(text)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    segments = _INLINE_MATH_RE.findall(text)
    if segments:
        last = next((g for g in segments[-1] if g), "").strip()
        if last:
            return last
    return _last_number(text)


def reference_answer(gold: str) -> str:
    """The final answer of a gold reference (stripped).

    The text after the last ``####`` (GSM8K rationales), else the content of the last
    ``\\boxed{}`` (MATH solutions), else ``gold`` itself.
    """
    gold = gold.strip()
    if "####" in gold:
        tail = gold.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else ""
    boxed = extract_boxed(gold)
    return boxed if boxed is not None else gold


def last_integer(text: str) -> str | None:
    """The last number token of ``text`` (``-?digits`` with an optional decimal part), or None."""
    matches = _INT_RE.findall(text)
    return matches[-1] if matches else None


def _timeouts() -> int | None:
    on_main = threading.current_thread() is threading.main_thread()
    return _MAIN_THREAD_TIMEOUT_S if on_main else None


def _quiet_math_verify() -> None:
    """math-verify warns once when timeouts are disabled; the reward boundary owns timeouts."""
    import math_verify.grader as grader
    import math_verify.parser as parser

    for module in (grader, parser):
        if hasattr(module, "TIMEOUT_WARNING_SHOWN"):
            module.TIMEOUT_WARNING_SHOWN = True


def _parse(expr: str) -> list[Any]:
    """math-verify parse of a bare answer: LaTeX without delimiters is wrapped in ``\\boxed{}``."""
    from math_verify import parse

    timeout = _timeouts()
    if timeout is None:
        _quiet_math_verify()
    expr = expr.strip()
    has_delims = _DELIMS_RE.search(expr) is not None
    wrapped = expr if has_delims else "\\boxed{" + expr + "}"
    candidates = [expr, wrapped] if _PROSE_RE.search(expr) else [wrapped, expr]
    for candidate in dict.fromkeys(candidates):
        parsed = parse(candidate, parsing_timeout=timeout)
        if parsed:
            return parsed
    return []


def is_equivalent(gold: str, predicted: str) -> bool | None:
    """Whether ``predicted`` is mathematically equivalent to ``gold``.

    Returns:
        True/False, or None when ``gold`` itself cannot be parsed (the sample cannot be judged).
    """
    from math_verify import verify

    gold_parsed = _parse(gold)
    if not gold_parsed:
        return None
    pred_parsed = _parse(predicted)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=_timeouts()))


def math_answer(
    prompts: list[str], completions: list[str], answer: list[Any], **_: Any
) -> list[float | None]:
    """1.0 if the completion's final answer is equivalent to ``answer``, else 0.0.

    Args:
        prompts: [N] prompts (unused).
        completions: [N] completions.
        answer: [N] gold answers (strings or numbers; LaTeX allowed), or reference solutions
            ending in ``#### N`` or holding a ``\\boxed{}`` (see ``reference_answer``).

    Returns:
        [N] scores; ``None`` where the gold answer is empty or unparseable.
    """
    scores: list[float | None] = []
    for i, (completion, gold) in enumerate(zip(completions, answer, strict=True)):
        gold_str = "" if gold is None else reference_answer(str(gold))
        if not gold_str:
            logger.warning("math_answer: sample %d has an empty gold answer", i)
            scores.append(None)
            continue
        predicted = extract_answer(completion)
        if predicted is None:
            scores.append(0.0)
            continue
        ok = is_equivalent(gold_str, predicted)
        if ok is None:
            logger.warning("math_answer: sample %d gold answer %r cannot be parsed", i, gold_str)
            scores.append(None)
        else:
            scores.append(1.0 if ok else 0.0)
    return scores


def exact_answer(
    prompts: list[str], completions: list[str], answer: list[Any], **_: Any
) -> list[float]:
    """1.0 if the last integer in the completion equals ``answer`` (as a string), else 0.0.

    Both sides are compared as integers when both are integer strings (so ``007`` matches ``7``),
    otherwise as stripped strings. No sympy; meant for the built-in arithmetic task.
    """
    scores: list[float] = []
    for completion, gold in zip(completions, answer, strict=True):
        got = last_integer(completion)
        want = str(gold).strip()
        if got is None:
            scores.append(0.0)
        elif re.fullmatch(r"-?\d+", got) and re.fullmatch(r"-?\d+", want):
            scores.append(1.0 if int(got) == int(want) else 0.0)
        else:
            scores.append(1.0 if got == want else 0.0)
    return scores
