"""`posttrain eval MODEL [RECIPE] [key=value ...]`: score a model on a recipe's held-out set.

Follows "A Sober Look at Progress in Language Model Reasoning" (Hochlehnert et al., 2025): greedy
accuracy; avg@k repeated over several seeds and reported as mean, std and 95% t-interval across
seeds; unbiased pass@k from all S x k samples of each problem. The decoding settings, seeds, k,
the chat template's SHA-256 with one rendered prompt, the model and the dataset are written next
to every result. Generation and scoring are `posttrain.eval.evaluate.evaluate_details`, the code
that produces the before/after numbers of a training run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from posttrain.config import Config, load_config, replace
from posttrain.eval.evaluate import EvalDetails, eval_settings, evaluate_details, summarize
from posttrain.eval.statistics import mean_pass_at_k, seed_stats


def split_args(extra: list[str]) -> tuple[str | None, list[str]]:
    """Split `[RECIPE] [key=value ...]`: the first argument is the recipe when it has no `=`."""
    if extra and "=" not in extra[0]:
        return extra[0], extra[1:]
    return None, list(extra)


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _dataset(cfg: Config, n_problems: int) -> dict[str, Any]:
    d = cfg.data
    source = d.eval_source or d.source
    return {
        "source": source,
        "split": "test",
        "task": dict(d.task) if source == "arithmetic" else None,
        "eval_size": d.eval_size,
        "num_problems": n_problems,
        "seed": d.seed,
        "prompt_column": d.prompt_column,
        "reward": cfg.eval.reward,
    }


def build_report(
    details: EvalDetails, cfg: Config, model: str, tokenizer: Any, rows: list[dict]
) -> dict[str, Any]:
    """The JSON document: every result with its decoding settings, seeds, template and data.

    Args:
        details: greedy [P] and sampled [S][P][K] correctness.
        cfg: the config the evaluation ran with.
        model: the model path or hub name.
        tokenizer: the model's tokenizer (chat template).
        rows: the evaluated rows (P of them).
    """
    settings = eval_settings(cfg, tokenizer, rows[0][cfg.data.prompt_column])
    common = {
        "model": model,
        "dataset": _dataset(cfg, len(details.greedy)),
        "system_prompt": cfg.data.system_prompt,
        "chat_template_sha256": settings.get("chat_template_sha256"),
        "example_prompt": settings.get("example_prompt"),
    }
    k, seeds = details.k, details.seeds
    sampled = {
        "temperature": cfg.eval.temperature,
        "top_p": cfg.eval.top_p,
        "max_new_tokens": settings["max_new_tokens"],
        "seeds": seeds,
        "k": k,
    }
    per_seed = [sum(map(sum, s)) / (len(s) * k) for s in details.sampled]
    st = seed_stats(per_seed)
    counts = [int(sum(sum(s[i]) for s in details.sampled)) for i in range(len(details.greedy))]
    n = len(seeds) * k
    pooled = {**sampled, "n_samples_per_problem": n, "estimator": "unbiased 1-C(n-c,k)/C(n,k)"}
    greedy = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": settings["max_new_tokens"]}
    results: dict[str, Any] = {
        "greedy_acc": {
            "value": sum(details.greedy) / len(details.greedy),
            "settings": {**greedy, "seeds": None, "k": 1, **common},
        },
        f"avg@{k}": {
            "mean": st.mean,
            "std": _nan_to_none(st.std),
            "ci95": [_nan_to_none(st.ci_low), _nan_to_none(st.ci_high)],
            "per_seed": [{"seed": s, "accuracy": a} for s, a in zip(seeds, per_seed, strict=True)],
            "settings": {**sampled, **common},
        },
    }
    for kk in sorted({1, k}):
        results[f"pass@{kk}"] = {
            "value": mean_pass_at_k(n, counts, kk),
            "settings": {**pooled, "k": kk, **common},
        }
    return {
        "model": model,
        "dataset": common["dataset"],
        "chat_template": getattr(tokenizer, "chat_template", None),
        "results": results,
        "metrics": summarize(details),
        "settings": settings,
    }


def format_table(report: dict[str, Any]) -> str:
    """A small text table of the report's results."""
    data = report["dataset"]
    lines = [
        f"[posttrain] eval {report['model']} on {data['source']} ({data['split']}, "
        f"{data['num_problems']} problems)",
        f"  {'metric':<12}{'value':>8}{'std':>8}   {'95% CI':<18}settings",
    ]
    for name, res in report["results"].items():
        s = res["settings"]
        value = res.get("value", res.get("mean"))
        std = f"{res['std']:8.3f}" if res.get("std") is not None else " " * 8
        ci = res.get("ci95")
        ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else ""
        how = f"T={s['temperature']} top_p={s['top_p']} max_new_tokens={s['max_new_tokens']}"
        if s.get("seeds") is not None:
            how += f" seeds={s['seeds']}"
        if "n_samples_per_problem" in s:
            how += f" n={s['n_samples_per_problem']}/problem"
        lines.append(f"  {name:<12}{value:8.3f}{std}   {ci_text:<18}{how}")
    return "\n".join(lines)


def run_eval(
    model: str, recipe: str | None, overrides: list[str], out: str | Path
) -> dict[str, Any]:
    """Load the config and model, evaluate, write the JSON report to `out`; returns the report.

    Raises:
        ConfigError: unknown key, bad value, missing model directory, data that does not load.
    """
    from posttrain.models import load_tokenizer, resolve_model_path

    cfg = load_config(recipe, overrides)
    path = resolve_model_path(model, "checkpoint")
    cfg = replace(cfg, model={"path": path})
    from posttrain.data.splits import load_eval_rows
    from posttrain.rollout.factory import make_rollout_engine

    rows = load_eval_rows(cfg)[: cfg.eval.num_problems]
    tokenizer = load_tokenizer(path)
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    engine_cfg = replace(cfg, rollout={"max_new_tokens": max(max_new, cfg.rollout.max_new_tokens)})
    engine = make_rollout_engine(engine_cfg, path, tokenizer)
    details = evaluate_details(engine, tokenizer, rows, cfg)
    if details is None:
        from posttrain.errors import ConfigError

        raise ConfigError("eval.num_problems is 0 or the held-out set is empty: nothing to score")
    report = build_report(details, cfg, path, tokenizer, rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report
