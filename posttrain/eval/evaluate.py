"""Held-out evaluation: greedy accuracy, avg@k over several seeds, unbiased pass@k.

Follows "A Sober Look at Progress in LM Reasoning": sampling accuracy is averaged over k samples
per problem and repeated over seeds, reported as mean and std across seeds, and the decoding
settings, seeds and template are recorded next to every result.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass
from typing import Any

from posttrain.config import Config
from posttrain.data.chat import render_prompt
from posttrain.eval.statistics import pass_at_k
from posttrain.models.vlm import prompt_inputs
from posttrain.rollout.engine import SamplingConfig
from rewards import RewardSpec, score


def _correct(cfg: Config, rows: list[dict], completions: list[str], per_row: int) -> list[float]:
    col = cfg.data.prompt_column
    rep = [rows[i // per_row] for i in range(len(completions))]
    columns = {k: [r[k] for r in rep] for k in rows[0] if k != col}
    result = score(
        [RewardSpec(cfg.eval.reward)],
        [r[col] for r in rep],
        completions,
        columns,
        timeout_s=cfg.reward_timeout_s,
    )
    return [1.0 if (v is not None and v >= 1.0) else 0.0 for v in result.total]


@dataclass(frozen=True)
class EvalDetails:
    """Per-sample correctness of one evaluation (1.0 correct, 0.0 not).

    Attributes:
        greedy: [P] greedy correctness per problem.
        sampled: [S][P][K] sampled correctness per seed, problem and sample.
        seeds: the S seeds.
        k: samples per problem per seed.
    """

    greedy: list[float]
    sampled: list[list[list[float]]]
    seeds: list[int]
    k: int


def evaluate_details(
    engine: Any, tokenizer: Any, rows: list[dict], cfg: Config
) -> EvalDetails | None:
    """Generate and score greedy and sampled completions for the first `eval.num_problems` rows.

    Args:
        engine: a RolloutEngine holding the weights to evaluate.
        tokenizer: its tokenizer (chat template).
        rows: held-out rows (prompt column + the `eval.reward` columns).
        cfg: the run config (`eval.*`, `data.system_prompt`, `data.max_prompt_tokens`).

    Returns:
        EvalDetails with greedy [P] and sampled [S][P][K] correctness; None when there are no
        rows.
    """
    ev = cfg.eval
    rows = rows[: ev.num_problems]
    if not rows:
        return None
    ids, kw = prompt_inputs(tokenizer, rows, cfg)  # a VLM's: images=[...]
    max_new = ev.max_new_tokens or cfg.rollout.max_new_tokens
    greedy_sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new)
    greedy = engine.generate(ids, greedy_sampling, **kw)
    greedy_correct = _correct(cfg, rows, [r.text for r in greedy], 1)
    sampled = [_sampled(engine, ids, rows, cfg, ev.k, seed, kw) for seed in ev.seeds]
    return EvalDetails(greedy_correct, sampled, list(ev.seeds), ev.k)


def _sampled(
    engine: Any,
    ids: list[list[int]],
    rows: list[dict],
    cfg: Config,
    n: int,
    seed: int,
    kw: dict[str, Any],
) -> list[list[float]]:
    """[P][n] correctness of n samples per problem at `eval.temperature`/`eval.top_p`."""
    ev = cfg.eval
    sampling = SamplingConfig(
        n=n,
        temperature=ev.temperature,
        top_p=ev.top_p,
        max_new_tokens=ev.max_new_tokens or cfg.rollout.max_new_tokens,
        seed=seed,
    )
    correct = _correct(cfg, rows, [r.text for r in engine.generate(ids, sampling, **kw)], n)
    return [correct[i * n : (i + 1) * n] for i in range(len(rows))]


def pass_counts(
    engine: Any, tokenizer: Any, rows: list[dict], cfg: Config, n: int
) -> list[list[int]] | None:
    """Correct samples among n per problem and seed: the data of a pass@k curve (k <= n).

    Draws n samples of each of the first `eval.num_problems` rows for every seed in `eval.seeds`
    (`eval.temperature`, `eval.top_p`, `eval.max_new_tokens`), separately from the avg@k samples.

    Args:
        engine: a RolloutEngine holding the weights to evaluate.
        tokenizer: its tokenizer (chat template).
        rows: held-out rows (prompt column + the `eval.reward` columns).
        cfg: the run config.
        n: samples per problem per seed.

    Returns:
        [S][P] correct counts (each in [0, n]); None without rows or seeds, or with n < 1.
    """
    rows = rows[: cfg.eval.num_problems]
    if not rows or n < 1 or not cfg.eval.seeds:
        return None
    ids, kw = prompt_inputs(tokenizer, rows, cfg)
    return [
        [int(sum(p)) for p in _sampled(engine, ids, rows, cfg, n, seed, kw)]
        for seed in cfg.eval.seeds
    ]


def summarize(details: EvalDetails) -> dict[str, float]:
    """The flat metrics logged during training (see `evaluate`)."""
    k = details.k
    greedy_acc = statistics.fmean(details.greedy)
    seed_accs = [
        statistics.fmean(c for problem in seed for c in problem) for seed in details.sampled
    ]
    pass_vals = [pass_at_k(k, int(sum(p)), k) for seed in details.sampled for p in seed]
    return {
        "eval/greedy_acc": greedy_acc,
        f"eval/avg@{k}_mean": statistics.fmean(seed_accs),
        f"eval/avg@{k}_std": statistics.stdev(seed_accs) if len(seed_accs) > 1 else 0.0,
        f"eval/pass@{k}": statistics.fmean(pass_vals),
    }


def evaluate(engine: Any, tokenizer: Any, rows: list[dict], cfg: Config) -> dict[str, float]:
    """Score the engine's current weights on held-out rows.

    Returns:
        `eval/greedy_acc`, `eval/avg@k_mean`, `eval/avg@k_std` (across seeds), `eval/pass@k`
        (mean over seeds and problems of pass@k from that seed's k samples); {} without rows.
    """
    details = evaluate_details(engine, tokenizer, rows, cfg)
    return {} if details is None else summarize(details)


def eval_settings(cfg: Config, tokenizer: Any = None, example_prompt: Any = None) -> dict[str, Any]:
    """Decoding settings, seeds and template recorded next to every result.

    Args:
        cfg: the run config.
        tokenizer: when given, the SHA-256 of its chat template is recorded.
        example_prompt: when given (with `tokenizer`), one prompt rendered by the template.
    """
    out = {
        "num_problems": cfg.eval.num_problems,
        "k": cfg.eval.k,
        "seeds": list(cfg.eval.seeds),
        "temperature": cfg.eval.temperature,
        "top_p": cfg.eval.top_p,
        "greedy": True,
        "max_new_tokens": cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
        "system_prompt": cfg.data.system_prompt,
        "template": "tokenizer chat template (add_generation_prompt=True)",
        "reward": cfg.eval.reward,
    }
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        out["chat_template_sha256"] = hashlib.sha256(template.encode("utf-8")).hexdigest()
        if example_prompt is not None:
            out["example_prompt"] = render_prompt(tokenizer, example_prompt, cfg.data.system_prompt)
    return out
