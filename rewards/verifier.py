"""``judge_verifier``: the soft model-based verifier of "Expanding RL with Verifiable Rewards Across
Diverse Domains" (Su et al., 2025). The judge compares the completion with the reference answer and
returns a score in [0, 1] (1 = the response's final answer is equivalent to the reference), through
the shared judge client of ``rewards/judge.py``."""

from __future__ import annotations

from typing import Any

from rewards.boundary import RewardOutput
from rewards.judge import (
    JudgeRequest,
    JudgeResult,
    check_lengths,
    check_unit_score,
    get_client,
    judge_metrics,
    render_prompt,
    split_options,
)

VERIFIER_SYSTEM = (
    "You are an expert grader. You see a question, a reference answer and a response. Decide "
    "whether the final answer of the response is equivalent to the reference answer (same meaning "
    "or value; ignore formatting, units written differently and extra explanation; a missing or "
    "hedged final answer is not equivalent). Reply with exactly one JSON object and nothing else: "
    '{"score": s} where s is a number in [0, 1]: 1 if equivalent, 0 if not, in between only when '
    "the response is partially correct or you are unsure."
)


def _validate_verifier(obj: dict) -> dict:
    return {"score": check_unit_score(obj)}


def verifier_request(prompt: Any, completion: str, reference: str) -> JudgeRequest:
    """The chat request asking the judge to compare ``completion`` with ``reference``."""
    question = render_prompt(prompt)
    user = (
        f"<question>\n{question}\n</question>\n"
        f"<reference_answer>\n{reference}\n</reference_answer>\n"
        f"<response>\n{completion}\n</response>"
    )
    messages = [
        {"role": "system", "content": VERIFIER_SYSTEM},
        {"role": "user", "content": user},
    ]
    parts = {
        "task": "verifier",
        "prompt": question,
        "completion": completion,
        "reference": reference,
    }
    return JudgeRequest(messages, parts, _validate_verifier)


def judge_verifier_detailed(
    prompts: list[Any],
    completions: list[str],
    answer: list[Any],
    *,
    base_url: str,
    model: str,
    **kw: Any,
) -> list[JudgeResult]:
    """Like ``judge_verifier`` but returns one JudgeResult per completion (score or reason)."""
    check_lengths(prompts, completions, answer=answer)
    client = get_client(base_url, model, **split_options(kw, len(completions), "judge_verifier"))
    results: list[JudgeResult | None] = [None] * len(completions)
    todo, requests = [], []
    for i, (p, c, a) in enumerate(zip(prompts, completions, answer, strict=True)):
        if a is None or (isinstance(a, str) and not a.strip()):
            results[i] = JudgeResult(None, "no_reference", f"sample {i} has no reference answer")
        else:
            todo.append(i)
            requests.append(verifier_request(p, c, str(a)))
    for i, res in zip(todo, client.judge_many(requests), strict=True):
        results[i] = res
    return [r for r in results if r is not None]


def judge_verifier(
    prompts: list[Any],
    completions: list[str],
    answer: list[Any],
    *,
    base_url: str,
    model: str,
    **kw: Any,
) -> list[float | None]:
    """Model-based soft verifier: the judge scores each completion against its reference answer.

    Args:
        prompts: N prompts (text or chat messages).
        completions: N completions.
        answer: N reference answers (the dataset's ``answer`` column).
        base_url: judge server root (see JudgeClient).
        model: judge model name.
        **kw: JudgeClient options (``api_key``, ``api_key_env``, ``max_concurrency``, ``timeout_s``,
            ``max_retries``, ``backoff_s``, ``cache_path``, ``temperature``, ``max_tokens``,
            ``json_mode``) and ``check`` (run check_reachable on first use, default True); other
            dataset columns are ignored.

    Returns:
        N scores in [0, 1]; None where the judge failed, as a ``RewardOutput`` whose ``reasons``
        say why (``unparseable``, ``timeout``, ``http_500``, ...: the reward boundary counts them
        as ``reward/<name>/errors/<reason>``) and whose ``metrics`` are ``judge_metrics``. The
        per-sample JudgeResults of the last call are also in ``judge_verifier.last_results``.
    """
    results = judge_verifier_detailed(
        prompts, completions, answer, base_url=base_url, model=model, **kw
    )
    judge_verifier.last_results = results  # type: ignore[attr-defined]
    return RewardOutput(
        [r.score for r in results],
        [r.reason for r in results],
        details=[r.detail for r in results],
        metrics=judge_metrics(results),
    )


judge_verifier.last_results = []  # type: ignore[attr-defined]
