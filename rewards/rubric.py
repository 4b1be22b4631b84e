"""Rubrics as Rewards (Gunjal et al., 2025): an LLM judge grades a completion against a rubric.

A rubric is a list of items ``{criterion: str, kind: essential|important|optional|pitfall,
weight: float > 0}`` (optional ``title: str``). ``weight`` defaults by kind (``DEFAULT_WEIGHTS``):
essential 1.0, important 0.7, optional 0.3, pitfall 0.9. A *pitfall* criterion describes a mistake
(e.g. "Claims that 'antibiotics' cure viral infections"); the judge marks it satisfied when the
response makes that mistake, and its weight is subtracted.

Aggregation:
- ``explicit``: the judge returns, per item, whether it is satisfied; with P the non-pitfall items,
  F the pitfalls and s_i in {0, 1}:

      score = clip((sum_{i in P} w_i * s_i - sum_{j in F} w_j * s_j) / sum_{i in P} w_i, 0, 1)

- ``implicit``: the judge sees the whole rubric (kinds and weights) and returns one score in [0, 1].

A failed or invalid judgement scores None (with a reason), never 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import ConfigError
from rewards.boundary import RewardOutput
from rewards.judge import (
    InvalidJudgeAnswerError,
    JudgeRequest,
    JudgeResult,
    check_lengths,
    check_unit_score,
    get_client,
    render_prompt,
    split_options,
)

KINDS = ("essential", "important", "optional", "pitfall")
DEFAULT_WEIGHTS = {"essential": 1.0, "important": 0.7, "optional": 0.3, "pitfall": 0.9}
AGGREGATIONS = ("explicit", "implicit")
ITEM_KEYS = ("criterion", "weight", "kind", "title")
_RUBRIC_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class RubricItem:
    """One criterion; ``weight`` is positive, pitfalls are subtracted by kind."""

    criterion: str
    weight: float
    kind: str
    title: str | None = None

    @property
    def is_pitfall(self) -> bool:
        return self.kind == "pitfall"


@dataclass(frozen=True)
class Rubric:
    """A validated rubric (see module docstring for the scoring formula)."""

    items: tuple[RubricItem, ...]

    @property
    def positive_total(self) -> float:
        """Sum of the non-pitfall weights (the normaliser, > 0)."""
        return sum(it.weight for it in self.items if not it.is_pitfall)

    def explicit_score(self, satisfied: Sequence[bool]) -> float:
        """``clip((satisfied positive weight - made pitfall weight) / positive_total, 0, 1)``."""
        if len(satisfied) != len(self.items):
            raise ValueError(f"{len(satisfied)} verdicts for {len(self.items)} rubric items")
        pairs = list(zip(self.items, satisfied, strict=True))
        gained = sum(it.weight for it, s in pairs if s and not it.is_pitfall)
        lost = sum(it.weight for it, s in pairs if s and it.is_pitfall)
        raw = (gained - lost) / self.positive_total
        return min(1.0, max(0.0, raw))

    def canonical(self) -> list[dict]:
        """Items as plain dicts with resolved weights (what the cache key hashes)."""
        return [asdict(it) for it in self.items]


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(
            f"rubric file {str(path)!r} does not exist (expected a .yaml/.yml/.json file)"
        )
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"rubric file {str(path)!r} could not be parsed: {e}") from e


def _load_source(obj: Any) -> tuple[Any, str]:
    """Resolve a path or JSON/YAML text to data; return (data, name used in error messages)."""
    if isinstance(obj, Path) or (
        isinstance(obj, str) and obj.strip().lower().endswith(_RUBRIC_SUFFIXES)
    ):
        path = Path(obj)
        return _load_file(path), f"rubric file {str(path)!r}: rubric"
    if isinstance(obj, str):
        text = obj.strip()
        if not text.startswith(("[", "{")):
            raise ConfigError(
                f"rubric {obj[:80]!r} is neither a .yaml/.yml/.json file path nor JSON text"
            )
        try:
            return json.loads(text), "rubric"
        except json.JSONDecodeError as e:
            raise ConfigError(f"rubric text is not valid JSON: {e}") from e
    return obj, "rubric"


def _parse_item(raw: Any, where: str) -> RubricItem:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with keys {list(ITEM_KEYS)}, got {raw!r}")
    extra = sorted(set(raw) - set(ITEM_KEYS))
    if extra:
        raise ConfigError(f"{where} has unknown keys {extra}; valid keys: {list(ITEM_KEYS)}")
    criterion = raw.get("criterion")
    if not isinstance(criterion, str) or not criterion.strip():
        raise ConfigError(f"{where}.criterion must be a non-empty string, got {criterion!r}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind={kind!r} is not valid; valid kinds: {list(KINDS)}")
    weight = raw.get("weight", DEFAULT_WEIGHTS[kind])
    valid_number = isinstance(weight, int | float) and not isinstance(weight, bool)
    if not valid_number or not math.isfinite(weight) or weight <= 0:
        raise ConfigError(
            f"{where}.weight={weight!r} must be a number > 0 (pitfalls are subtracted by kind, so "
            f"give their weight as a positive number; omit it for the default "
            f"{DEFAULT_WEIGHTS[kind]})"
        )
    title = raw.get("title")
    if title is not None and not isinstance(title, str):
        raise ConfigError(f"{where}.title must be a string, got {title!r}")
    return RubricItem(criterion.strip(), float(weight), kind, title)


def parse_rubric(obj_or_path: Any) -> Rubric:
    """Validate a rubric.

    Args:
        obj_or_path: a Rubric; a list of item mappings; a mapping ``{"rubric": [...]}``; a path
            (str or Path ending in .yaml/.yml/.json) to a file holding either; or JSON text.

    Returns:
        The Rubric, weights resolved (DEFAULT_WEIGHTS by kind when omitted).

    Raises:
        ConfigError: naming the item index and field and what would be valid.
    """
    if isinstance(obj_or_path, Rubric):
        return obj_or_path
    data, where = _load_source(obj_or_path)
    if isinstance(data, dict):
        if set(data) != {"rubric"}:
            raise ConfigError(
                f"{where} mapping must have the single key 'rubric' (a list of items), "
                f"got {sorted(data)}"
            )
        data = data["rubric"]
    if not isinstance(data, list) or not data:
        raise ConfigError(
            f"{where} must be a non-empty list of items {{criterion, kind, weight}}, "
            f"got {data!r:.80}"
        )
    items = tuple(_parse_item(raw, f"{where}[{i}]") for i, raw in enumerate(data))
    if all(it.is_pitfall for it in items):
        raise ConfigError(
            f"{where} has only pitfall items; add at least one essential/important/optional item"
        )
    return Rubric(items)


@dataclass(frozen=True)
class ItemResult:
    """One rubric item's verdict for one completion (``satisfied`` is None for implicit grading)."""

    criterion: str
    kind: str
    weight: float
    satisfied: bool | None


@dataclass(frozen=True)
class RubricSample:
    """Per-sample log: the score (or None + reason) and the per-item verdicts."""

    score: float | None
    aggregation: str
    items: tuple[ItemResult, ...]
    reason: str | None = None
    detail: str = ""
    cached: bool = False

    def to_log(self) -> dict:
        """A JSON-serialisable dict for per-sample logs."""
        return asdict(self)


_SYSTEM_COMMON = (
    "You are a strict expert grader. You see a question, a response and a rubric of numbered "
    "criteria, each with a kind (essential, important, optional or pitfall) and a weight. "
    "Criteria of kind pitfall describe a mistake; a pitfall is satisfied only if the response "
    "makes that mistake. Judge the response only, and reply with exactly one JSON object and "
    "nothing else: "
)
EXPLICIT_SYSTEM = _SYSTEM_COMMON + (
    'for every criterion, whether it is satisfied: {"items": [{"id": 1, "satisfied": true}, '
    '{"id": 2, "satisfied": false}, ...]} with one entry per criterion id.'
)
IMPLICIT_SYSTEM = _SYSTEM_COMMON + (
    'one overall score: {"score": s} where s in [0, 1] reflects how well the response meets the '
    "rubric, weighing criteria by kind and weight; a pitfall that is made lowers the score."
)


def render_rubric(rubric: Rubric) -> str:
    """Rubric lines ``[id] (kind, weight w) criterion``, ids from 1."""
    return "\n".join(
        f"[{i}] ({it.kind}, weight {it.weight:g}) {it.criterion}"
        for i, it in enumerate(rubric.items, start=1)
    )


def _explicit_validator(n_items: int):
    def validate(obj: dict) -> dict:
        entries = obj.get("items")
        if not isinstance(entries, list):
            raise InvalidJudgeAnswerError(f"field 'items' must be a list, got {entries!r:.80}")
        verdicts: dict[int, bool] = {}
        for e in entries:
            ok = (
                isinstance(e, dict)
                and isinstance(e.get("id"), int)
                and not isinstance(e["id"], bool)
            )
            if not ok or not isinstance(e.get("satisfied"), bool):
                raise InvalidJudgeAnswerError(
                    f"item {e!r:.80} needs an integer 'id' and boolean 'satisfied'"
                )
            if not 1 <= e["id"] <= n_items or e["id"] in verdicts:
                raise InvalidJudgeAnswerError(
                    f"item id {e['id']} is out of 1..{n_items} or repeated"
                )
            verdicts[e["id"]] = e["satisfied"]
        if len(verdicts) != n_items:
            missing = sorted(set(range(1, n_items + 1)) - set(verdicts))
            raise InvalidJudgeAnswerError(f"no verdict for criteria {missing}")
        return {"satisfied": [verdicts[i] for i in range(1, n_items + 1)]}

    return validate


def _implicit_validate(obj: dict) -> dict:
    return {"score": check_unit_score(obj)}


def rubric_request(prompt: Any, completion: str, rubric: Rubric, aggregation: str) -> JudgeRequest:
    """The chat request grading ``completion`` against ``rubric`` with the given aggregation."""
    question = render_prompt(prompt)
    user = (
        f"<question>\n{question}\n</question>\n"
        f"<response>\n{completion}\n</response>\n"
        f"<rubric>\n{render_rubric(rubric)}\n</rubric>"
    )
    explicit = aggregation == "explicit"
    messages = [
        {"role": "system", "content": EXPLICIT_SYSTEM if explicit else IMPLICIT_SYSTEM},
        {"role": "user", "content": user},
    ]
    parts = {
        "task": f"rubric-{aggregation}",
        "prompt": question,
        "completion": completion,
        "rubric": rubric.canonical(),
    }
    validate = _explicit_validator(len(rubric.items)) if explicit else _implicit_validate
    return JudgeRequest(messages, parts, validate)


def _to_sample(rubric: Rubric, aggregation: str, res: JudgeResult) -> RubricSample:
    verdicts: Sequence[bool | None] = [None] * len(rubric.items)
    score = None
    if res.value is not None:
        if aggregation == "explicit":
            verdicts = res.value["satisfied"]
            score = rubric.explicit_score(res.value["satisfied"])
        else:
            score = float(res.value["score"])
    items = tuple(
        ItemResult(it.criterion, it.kind, it.weight, v)
        for it, v in zip(rubric.items, verdicts, strict=True)
    )
    return RubricSample(score, aggregation, items, res.reason, res.detail, res.cached)


def _per_sample_rubrics(rubric: Any, n: int) -> list[Rubric | None]:
    """One Rubric (or None) per sample from a shared rubric or a per-sample column."""
    items_list = (  # a list of item mappings, not a column of {"rubric": [...]} mappings
        isinstance(rubric, list)
        and all(isinstance(x, dict) for x in rubric)
        and not all(set(x) == {"rubric"} for x in rubric)
    )
    shared = isinstance(rubric, str | Path | dict | Rubric) or items_list
    if shared:
        return [parse_rubric(rubric)] * n
    if not isinstance(rubric, list | tuple) or len(rubric) != n:
        raise ConfigError(
            f"rubric must be one rubric (list of items, file path or JSON) or a column with one "
            f"per completion ({n}), got {type(rubric).__name__}"
        )
    parsed: dict[str, Rubric] = {}
    out: list[Rubric | None] = []
    for i, r in enumerate(rubric):
        if r is None:
            out.append(None)
            continue
        key = r if isinstance(r, str) else json.dumps(r, sort_keys=True, default=str)
        if key not in parsed:
            try:
                parsed[key] = parse_rubric(r)
            except ConfigError as e:
                raise ConfigError(f"rubric of sample {i}: {e}") from e
        out.append(parsed[key])
    return out


def rubric_detailed(
    prompts: list[Any],
    completions: list[str],
    rubric: Any,
    *,
    base_url: str,
    model: str,
    aggregation: str = "explicit",
    **kw: Any,
) -> list[RubricSample]:
    """Like ``rubric`` but returns one RubricSample per completion (score, reason, verdicts)."""
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"rubric aggregation={aggregation!r} is not valid; valid: {AGGREGATIONS}")
    check_lengths(prompts, completions)
    rubrics = _per_sample_rubrics(rubric, len(completions))
    client = get_client(base_url, model, **split_options(kw, len(completions), "rubric"))
    todo = [i for i, r in enumerate(rubrics) if r is not None]
    requests = [rubric_request(prompts[i], completions[i], rubrics[i], aggregation) for i in todo]
    results = dict(zip(todo, client.judge_many(requests), strict=True))
    samples = []
    for i, r in enumerate(rubrics):
        if r is None:
            samples.append(RubricSample(None, aggregation, (), "no_rubric", f"sample {i} has none"))
        else:
            samples.append(_to_sample(r, aggregation, results[i]))
    return samples


def rubric(
    prompts: list[Any],
    completions: list[str],
    rubric: Any,
    *,
    base_url: str,
    model: str,
    aggregation: str = "explicit",
    **kw: Any,
) -> list[float | None]:
    """Rubric reward: an LLM judge grades each completion against a rubric.

    Args:
        prompts: N prompts (text or chat messages).
        completions: N completions.
        rubric: one rubric for all samples (list of items, ``{"rubric": [...]}``, .yaml/.yml/.json
            path or JSON text), or a column with one such rubric (or None) per completion.
        base_url: judge server root (see rewards.judge.JudgeClient).
        model: judge model name.
        aggregation: ``explicit`` (per-item verdicts, weighted formula) or ``implicit`` (one
            judge score).
        **kw: JudgeClient options (``api_key``, ``api_key_env``, ``max_concurrency``, ``timeout_s``,
            ``max_retries``, ``backoff_s``, ``cache_path``, ``temperature``, ``max_tokens``,
            ``json_mode``, ``check``); other dataset columns are ignored.

    Returns:
        N scores in [0, 1]; None where the judge failed or the sample has no rubric, as a
        ``RewardOutput`` whose ``reasons`` say why (``unparseable``, ``invalid_answer``,
        ``timeout``, ``http_<status>``, ``no_rubric``, ...: counted by the reward boundary as
        ``reward/<name>/errors/<reason>``) and whose ``metrics`` are ``rubric_metrics`` (logged as
        ``reward/<name>/essential/satisfied_rate``, ...). The RubricSamples of the last call are
        also in ``rubric.last_breakdown``.
    """
    samples = rubric_detailed(
        prompts, completions, rubric, base_url=base_url, model=model, aggregation=aggregation, **kw
    )
    _REWARD_FN.last_breakdown = samples  # the parameter `rubric` shadows this function's name
    return RewardOutput(
        [s.score for s in samples],
        [s.reason for s in samples],
        details=[s.detail for s in samples],
        metrics=rubric_metrics(samples, prefix=""),
    )


rubric.last_breakdown = []  # type: ignore[attr-defined]
_REWARD_FN = rubric


def rubric_metrics(samples: Sequence[RubricSample], prefix: str = "rubric") -> dict[str, float]:
    """Aggregate per-item verdicts into metrics.

    Returns:
        ``<prefix>/invalid_frac`` (share of samples scored None), ``<prefix>/score_mean`` (over
        valid samples) and, for explicit grading, ``<prefix>/<kind>/satisfied_rate`` (satisfied
        items / items of that kind over valid samples; for pitfall, the share made). With
        ``prefix=""`` the keys have no prefix (``invalid_frac``, ...).
    """
    if not samples:
        return {}
    pre = f"{prefix}/" if prefix else ""
    valid = [s for s in samples if s.score is not None]
    metrics = {f"{pre}invalid_frac": 1.0 - len(valid) / len(samples)}
    if valid:
        metrics[f"{pre}score_mean"] = sum(s.score for s in valid) / len(valid)  # type: ignore[misc]
    for kind in KINDS:
        verdicts = [
            it.satisfied
            for s in valid
            for it in s.items
            if it.kind == kind and it.satisfied is not None
        ]
        if verdicts:
            metrics[f"{pre}{kind}/satisfied_rate"] = sum(verdicts) / len(verdicts)
    return metrics
