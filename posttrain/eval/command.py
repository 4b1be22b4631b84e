"""`posttrain eval MODEL [RECIPE] [key=value ...] [--before MODEL0]`: score a model on a recipe's
held-out set.

Follows "A Sober Look at Progress in Language Model Reasoning" (Hochlehnert et al., 2025): greedy
accuracy; avg@k repeated over several seeds and reported as mean, std and 95% t-interval across
seeds; unbiased pass@k from all S x k samples of each problem. The decoding settings, seeds, k,
the chat template's SHA-256 with one rendered prompt, the model and the dataset are written next
to every result. Generation and scoring are `posttrain.eval.evaluate.evaluate_details`, the code
that produces the before/after numbers of a training run. With `eval.pass_k_max` = K > 0 it also
draws K more samples per problem and seed for the pass@k curve (`posttrain.eval.pass_curve`);
`--before MODEL0` evaluates MODEL0 the same way first, draws both curves in one PNG and counts
the problems solved after but never before, and the reverse.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from posttrain.config import Config, load_config, replace
from posttrain.eval import pass_curve
from posttrain.eval.evaluate import (
    EvalDetails,
    eval_settings,
    evaluate_details,
    pass_counts,
    summarize,
)
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
        "task": dict(d.task) if source in ("arithmetic", "shapes") else None,
        "eval_size": d.eval_size,
        "num_problems": n_problems,
        "seed": d.seed,
        "prompt_column": d.prompt_column,
        "reward": cfg.eval.reward,
    }


def build_report(
    details: EvalDetails,
    cfg: Config,
    model: str,
    tokenizer: Any,
    rows: list[dict],
    curve_counts: list[list[int]] | None = None,
) -> dict[str, Any]:
    """The JSON document: every result with its decoding settings, seeds, template and data.

    Args:
        details: greedy [P] and sampled [S][P][K] correctness.
        cfg: the config the evaluation ran with.
        model: the model path or hub name.
        tokenizer: the model's tokenizer (chat template).
        rows: the evaluated rows (P of them).
        curve_counts: [S][P] correct samples among `eval.pass_k_max` per problem and seed, for
            the `pass_at_k_curve` entry; None leaves it out.
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
    report = {
        "model": model,
        "dataset": common["dataset"],
        "chat_template": getattr(tokenizer, "chat_template", None),
        "results": results,
        "metrics": summarize(details),
        "settings": settings,
    }
    if curve_counts is not None:
        how = {k: v for k, v in sampled.items() if k not in ("seeds", "k")}
        report["pass_at_k_curve"] = pass_curve.curve_doc(
            curve_counts, cfg.eval.pass_k_max, seeds, {**how, **common}
        )
    return report


def format_table(report: dict[str, Any]) -> str:
    """A small text table of the report's results; with a `before` report, its table first,
    then both pass@k curves and the solved-after/before counts."""
    lines = []
    if "before" in report:
        lines += [_results_table(report["before"], "(before) "), ""]
    lines.append(_results_table(report, "(after) " if "before" in report else ""))
    curves = _curves(report)
    if curves:
        lines += pass_curve.format_lines(curves, report.get("pass_at_k_solved"))
    if "pass_at_k_png" in report:
        lines.append(f"  pass@k curves: {report['pass_at_k_png']}")
    return "\n".join(lines)


def _results_table(report: dict[str, Any], label: str = "") -> str:
    data = report["dataset"]
    lines = [
        f"[posttrain] eval {label}{report['model']} on {data['source']} ({data['split']}, "
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
    model: str,
    recipe: str | None,
    overrides: list[str],
    out: str | Path,
    before: str | None = None,
    png: str | Path | None = None,
) -> dict[str, Any]:
    """Load the config and model(s), evaluate, write the JSON report to `out`; returns the report.

    Args:
        model: the model to evaluate (a directory or hub name).
        recipe, overrides: the config.
        out: the JSON report's path.
        before: a second model evaluated the same way first (e.g. the one training started
            from); the report then holds it under `before`, the solved-after/before counts under
            `pass_at_k_solved`, and the PNG draws both curves.
        png: where the pass@k PNG goes (default: `<out stem>.pass_at_k.png` next to `out`);
            drawn when `eval.pass_k_max` > 0.

    Raises:
        ConfigError: unknown key, bad value, missing model directory, data that does not load.
    """
    from posttrain.errors import ConfigError
    from posttrain.models import resolve_model_path

    cfg = load_config(recipe, overrides)
    path = resolve_model_path(model, "checkpoint")
    before_path = resolve_model_path(before, "checkpoint") if before else None
    from posttrain.data.splits import load_eval_rows

    rows = load_eval_rows(replace(cfg, model={"path": path}))[: cfg.eval.num_problems]
    if not rows:
        raise ConfigError("eval.num_problems is 0 or the held-out set is empty: nothing to score")
    # the model before first: its engine is shut down before the next one starts
    first = _evaluate_model(cfg, before_path, rows, close=True) if before_path else None
    report = _evaluate_model(cfg, path, rows)
    if first is not None:
        report["before"] = first
    curves = _curves(report)
    if len(curves) == 2:
        report["pass_at_k_solved"] = pass_curve.compare(curves["before"], curves["after"])
    out = Path(out)
    if curves:
        png = Path(png) if png else out.with_name(f"{out.stem}.{pass_curve.PNG_NAME}")
        title, solved = _png_title(report), report.get("pass_at_k_solved")
        report["pass_at_k_png"] = str(pass_curve.plot(curves, png, title=title, solved=solved))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def _curves(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """label -> pass@k curve document: "before" and "after" with `--before`, else "model"."""
    curves = {}
    if "pass_at_k_curve" in report.get("before", {}):
        curves["before"] = report["before"]["pass_at_k_curve"]
    if "pass_at_k_curve" in report:
        curves["after" if curves else "model"] = report["pass_at_k_curve"]
    return curves


def _png_title(report: dict[str, Any]) -> str:
    title = f"{report['dataset']['source']}: {Path(report['model']).name}"
    if "before" in report:
        title += f" vs {Path(report['before']['model']).name}"
    return title


def _evaluate_model(
    cfg: Config, path: str, rows: list[dict], close: bool = False
) -> dict[str, Any]:
    """Evaluate one model (greedy, avg@k, the pass@k curve's counts) and build its report.

    Args:
        cfg: the config (its `model.path` is replaced by `path`).
        path: the resolved model path.
        rows: the held-out rows to score.
        close: shut the engine down afterwards (another model is evaluated in this process).
    """
    from posttrain.models import load_tokenizer
    from posttrain.rollout.factory import make_rollout_engine

    cfg = replace(cfg, model={"path": path})
    tokenizer = load_tokenizer(path)
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    engine_cfg = replace(cfg, rollout={"max_new_tokens": max(max_new, cfg.rollout.max_new_tokens)})
    engine = make_rollout_engine(engine_cfg, path, tokenizer)
    try:
        details = evaluate_details(engine, tokenizer, rows, cfg)
        assert details is not None  # rows is not empty
        counts = pass_counts(engine, tokenizer, rows, cfg, cfg.eval.pass_k_max)
    finally:
        if close and hasattr(engine, "close"):
            engine.close()
    return build_report(details, cfg, path, tokenizer, rows, counts)
