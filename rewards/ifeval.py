"""IFEval-style verifiable instruction checks and the ``ifeval`` reward.

Each sample's ``instructions`` column entry is a list of ``{"kind": <check>, **kwargs}`` dicts
(a JSON string of that list is accepted too). The reward is the fraction of instructions the
completion satisfies. Kinds are the short names in ``CHECKS`` or the original IFEval instruction
ids (``"punctuation:no_comma"``, ...; see ``IFEVAL_IDS``) with IFEval's kwarg names, so the
google/IFEval rows convert with ``from_ifeval_row``. Semantics follow the IFEval reference
implementation (Zhou et al., 2023) where one exists.

Relations (``relation``/``let_relation``/``capital_relation``): ``"at least"`` (default),
``"less than"``, ``"at most"``, ``"more than"``, ``"exactly"``.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import re
from collections.abc import Callable
from typing import Any

__all__ = ["CHECKS", "IFEVAL_IDS", "check_instruction", "from_ifeval_row", "ifeval"]

logger = logging.getLogger("posttrain.rewards")

_RELATIONS: dict[str, Callable[[int, int], bool]] = {
    "at least": lambda count, n: count >= n,
    "less than": lambda count, n: count < n,
    "at most": lambda count, n: count <= n,
    "more than": lambda count, n: count > n,
    "exactly": lambda count, n: count == n,
}
_CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _compare(count: int, n: int, relation: str) -> bool:
    if relation not in _RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; valid: {', '.join(_RELATIONS)}")
    return _RELATIONS[relation](count, int(n))


def _word_re(word: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)", re.IGNORECASE)


def _paragraphs(text: str, separator: str | None) -> list[str] | None:
    """Non-empty paragraphs, or None when an empty paragraph sits between two others."""
    if separator is None:
        parts = re.split(r"\n\s*\n", text)
    elif separator == "***":
        parts = re.split(r"\s?\*\*\*\s?", text)
    else:
        parts = text.split(separator)
    for i, p in enumerate(parts):
        if not p.strip() and 0 < i < len(parts) - 1:
            return None
    return [p for p in parts if p.strip()]


# --- checks: check(text, **kwargs) -> bool ---------------------------------------------------


def word_count(text: str, num_words: int, relation: str = "at least") -> bool:
    return _compare(len(re.findall(r"\w+", text)), num_words, relation)


def sentence_count(text: str, num_sentences: int, relation: str = "at least") -> bool:
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", s)]
    return _compare(len(sentences), num_sentences, relation)


def paragraph_count(text: str, num_paragraphs: int, separator: str | None = None) -> bool:
    """Exactly ``num_paragraphs``; separator None = blank lines, ``"***"`` = IFEval dividers."""
    paras = _paragraphs(text, separator)
    return paras is not None and len(paras) == int(num_paragraphs)


def nth_paragraph_first_word(
    text: str, num_paragraphs: int, nth_paragraph: int, first_word: str
) -> bool:
    paras, nth = _paragraphs(text, None), int(nth_paragraph)
    if paras is None or len(paras) != int(num_paragraphs) or not 1 <= nth <= len(paras):
        return False
    words = paras[nth - 1].split()
    first = re.sub(r"[^\w]", "", words[0]).lower() if words else ""
    return first == first_word.strip().lower()


def keywords_present(text: str, keywords: list[str]) -> bool:
    return all(_word_re(k).search(text) for k in keywords)


def keyword_frequency(text: str, keyword: str, frequency: int, relation: str = "at least") -> bool:
    return _compare(len(_word_re(keyword).findall(text)), frequency, relation)


def forbidden_words(text: str, forbidden_words: list[str]) -> bool:
    return not any(_word_re(w).search(text) for w in forbidden_words)


def letter_frequency(
    text: str, letter: str, let_frequency: int, let_relation: str = "at least"
) -> bool:
    if len(letter) != 1:
        raise ValueError(f"letter_frequency: letter must be one character, got {letter!r}")
    return _compare(text.lower().count(letter.lower()), let_frequency, let_relation)


def no_comma(text: str) -> bool:
    return "," not in text


def all_lowercase(text: str) -> bool:
    return text == text.lower()


def all_uppercase(text: str) -> bool:
    return text == text.upper()


def capital_word_frequency(
    text: str, capital_frequency: int, capital_relation: str = "at least"
) -> bool:
    capitals = [w for w in re.findall(r"\w+", text) if w.isupper()]
    return _compare(len(capitals), capital_frequency, capital_relation)


def bullet_count(text: str, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` Markdown bullets (``* item`` or ``- item`` lines)."""
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == int(num_bullets)


def highlighted_sections(text: str, num_highlights: int) -> bool:
    """At least ``num_highlights`` ``*highlighted*`` (or ``**bold**``) spans."""
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h.strip("*").strip()]
    return len(single) + len(double) >= int(num_highlights)


def section_count(text: str, num_sections: int, section_spliter: str = "Section") -> bool:
    """At least ``num_sections`` sections headed ``<section_spliter> <number>``."""
    parts = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", text)
    return len(parts) - 1 >= int(num_sections)


def title(text: str) -> bool:
    """A title wrapped in double angular brackets, e.g. ``<<poem of joy>>``."""
    return any(t.strip("<>").strip() for t in re.findall(r"<<[^\n]+>>", text))


def end_phrase(text: str, end_phrase: str) -> bool:
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def start_phrase(text: str, start_phrase: str) -> bool:
    return text.strip().lower().startswith(start_phrase.strip().lower())


def quotation(text: str) -> bool:
    stripped = text.strip()
    return len(stripped) > 1 and stripped[0] == '"' and stripped[-1] == '"'


def json_format(text: str) -> bool:
    stripped = text.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        stripped = stripped.removeprefix(prefix)
    stripped = stripped.removesuffix("```").strip()
    try:
        json.loads(stripped)
    except ValueError:
        return False
    return True


def placeholder_count(text: str, num_placeholders: int) -> bool:
    """At least ``num_placeholders`` square-bracket placeholders such as ``[address]``."""
    return len(re.findall(r"\[.*?\]", text)) >= int(num_placeholders)


def postscript(text: str, postscript_marker: str = "P.S.") -> bool:
    marker = re.escape(postscript_marker.strip().lower()).replace(r"\.", r"\.\s?")
    return re.search(r"^\s*" + marker, text.lower(), flags=re.MULTILINE) is not None


def constrained_response(text: str) -> bool:
    return any(option in text.strip() for option in _CONSTRAINED)


def two_responses(text: str) -> bool:
    """Two different responses separated by six asterisks ``******``."""
    parts = text.split("******")
    valid = []
    for i, part in enumerate(parts):
        if not part.strip():
            if 0 < i < len(parts) - 1:
                return False
        else:
            valid.append(part.strip())
    return len(valid) == 2 and valid[0] != valid[1]


def repeat_prompt(text: str, prompt_to_repeat: str) -> bool:
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


CHECKS: dict[str, Callable[..., bool]] = {
    f.__name__: f
    for f in (
        word_count,
        sentence_count,
        paragraph_count,
        nth_paragraph_first_word,
        keywords_present,
        keyword_frequency,
        forbidden_words,
        letter_frequency,
        no_comma,
        all_lowercase,
        all_uppercase,
        capital_word_frequency,
        bullet_count,
        highlighted_sections,
        section_count,
        title,
        end_phrase,
        start_phrase,
        quotation,
        json_format,
        placeholder_count,
        postscript,
        constrained_response,
        two_responses,
        repeat_prompt,
    )
}

# IFEval instruction id -> (check, fixed kwargs).
IFEVAL_IDS: dict[str, tuple[str, dict[str, Any]]] = {
    "length_constraints:number_words": ("word_count", {}),
    "length_constraints:number_sentences": ("sentence_count", {}),
    "length_constraints:number_paragraphs": ("paragraph_count", {"separator": "***"}),
    "length_constraints:nth_paragraph_first_word": ("nth_paragraph_first_word", {}),
    "keywords:existence": ("keywords_present", {}),
    "keywords:frequency": ("keyword_frequency", {}),
    "keywords:forbidden_words": ("forbidden_words", {}),
    "keywords:letter_frequency": ("letter_frequency", {}),
    "punctuation:no_comma": ("no_comma", {}),
    "change_case:english_lowercase": ("all_lowercase", {}),
    "change_case:english_capital": ("all_uppercase", {}),
    "change_case:capital_word_frequency": ("capital_word_frequency", {}),
    "detectable_format:number_bullet_lists": ("bullet_count", {}),
    "detectable_format:number_highlighted_sections": ("highlighted_sections", {}),
    "detectable_format:multiple_sections": ("section_count", {}),
    "detectable_format:title": ("title", {}),
    "detectable_format:json_format": ("json_format", {}),
    "detectable_format:constrained_response": ("constrained_response", {}),
    "detectable_content:number_placeholders": ("placeholder_count", {}),
    "detectable_content:postscript": ("postscript", {}),
    "startend:end_checker": ("end_phrase", {}),
    "startend:quotation": ("quotation", {}),
    "combination:two_responses": ("two_responses", {}),
    "combination:repeat_prompt": ("repeat_prompt", {}),
}


def _resolve(instruction: dict[str, Any]) -> tuple[str, Callable[..., bool], dict[str, Any]]:
    """(kind, check, kwargs) of one instruction dict; raises ValueError naming what is valid."""
    if not isinstance(instruction, dict) or "kind" not in instruction:
        raise ValueError(
            f"ifeval: each instruction must be a dict with a 'kind', got {instruction!r}"
        )
    kind = instruction["kind"]
    kwargs = {k: v for k, v in instruction.items() if k not in ("kind", "kwargs")}
    kwargs.update(instruction.get("kwargs") or {})
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # IFEval rows pad with nulls
    name, fixed = IFEVAL_IDS.get(kind, (kind, {}))
    if name not in CHECKS:
        valid = sorted(CHECKS) + sorted(IFEVAL_IDS)
        close = difflib.get_close_matches(str(kind), valid, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise ValueError(
            f"ifeval: unknown instruction kind {kind!r}; {hint}valid: {sorted(CHECKS)}"
        )
    fn = CHECKS[name]
    params = list(inspect.signature(fn).parameters)[1:]
    extra = sorted(set(kwargs) - set(params))
    if extra:
        raise ValueError(
            f"ifeval: kind {kind!r} got unknown kwargs {extra}; valid kwargs: {params}"
        )
    return name, fn, {**fixed, **kwargs}


def check_instruction(text: str, instruction: dict[str, Any]) -> bool:
    """Whether ``text`` satisfies one instruction ``{"kind": ..., **kwargs}``."""
    kind, fn, kwargs = _resolve(instruction)
    try:
        return bool(fn(text, **kwargs))
    except TypeError as e:
        raise ValueError(f"ifeval: kind {kind!r} with kwargs {kwargs}: {e}") from e


def from_ifeval_row(instruction_id_list: list[str], kwargs: list[dict]) -> list[dict[str, Any]]:
    """Convert a google/IFEval row (``instruction_id_list``, ``kwargs``) to ``instructions``."""
    return [{"kind": k, **(kw or {})} for k, kw in zip(instruction_id_list, kwargs, strict=True)]


def _as_list(entry: Any, i: int) -> list[dict[str, Any]]:
    if isinstance(entry, str):
        entry = json.loads(entry)
    if isinstance(entry, dict):
        entry = [entry]
    if not isinstance(entry, list):
        raise ValueError(f"ifeval: sample {i} instructions must be a list of dicts, got {entry!r}")
    return entry


def ifeval(
    prompts: list[str], completions: list[str], instructions: list[Any], **_: Any
) -> list[float | None]:
    """Fraction of each sample's instructions the completion satisfies.

    Args:
        prompts: [N] prompts (unused).
        completions: [N] completions.
        instructions: [N] lists of ``{"kind": ..., **kwargs}`` (or JSON strings of such lists).

    Returns:
        [N] scores in [0, 1]; ``None`` for a sample with no instructions.

    Raises:
        ValueError: an unknown kind or kwarg anywhere in the batch (validated before scoring).
    """
    per_sample = [_as_list(entry, i) for i, entry in enumerate(instructions)]
    for items in per_sample:
        for item in items:
            _resolve(item)
    scores: list[float | None] = []
    for i, (completion, items) in enumerate(zip(completions, per_sample, strict=True)):
        if not items:
            scores.append(None)
            continue
        results = [check_instruction(completion, item) for item in items]
        logger.debug(
            "ifeval sample %d: %s",
            i,
            [(it["kind"], ok) for it, ok in zip(items, results, strict=True)],
        )
        scores.append(sum(results) / len(results))
    return scores
