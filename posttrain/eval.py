"""Held-out evaluation: greedy accuracy, avg@k over several seeds, unbiased pass@k.

Follows "A Sober Look at Progress in LM Reasoning": sampling accuracy is averaged over k samples
per problem and repeated over seeds, reported as mean and std across seeds, and the decoding
settings, seeds and template are recorded next to every result.
"""

from __future__ import annotations

import statistics
from typing import Any

from posttrain.config import Config
from posttrain.data.chat import encode_prompts
from posttrain.evalmath import pass_at_k
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


def evaluate(engine: Any, tokenizer: Any, rows: list[dict], cfg: Config) -> dict[str, float]:
    """Score the engine's current weights on held-out rows.

    Returns:
        `eval/greedy_acc`, `eval/avg@k_mean`, `eval/avg@k_std` (across seeds), `eval/pass@k`.
    """
    ev = cfg.eval
    rows = rows[: ev.num_problems]
    if not rows:
        return {}
    ids = encode_prompts(
        tokenizer,
        [r[cfg.data.prompt_column] for r in rows],
        cfg.data.system_prompt,
        cfg.data.max_prompt_tokens,
    )
    max_new = ev.max_new_tokens or cfg.rollout.max_new_tokens
    greedy = engine.generate(ids, SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new))
    greedy_acc = statistics.fmean(_correct(cfg, rows, [r.text for r in greedy], 1))
    seed_accs, pass_vals = [], []
    for seed in ev.seeds:
        sampling = SamplingConfig(
            n=ev.k, temperature=ev.temperature, top_p=1.0, max_new_tokens=max_new, seed=seed
        )
        outs = engine.generate(ids, sampling)
        correct = _correct(cfg, rows, [r.text for r in outs], ev.k)
        seed_accs.append(statistics.fmean(correct))
        for i in range(len(rows)):
            c = int(sum(correct[i * ev.k : (i + 1) * ev.k]))
            pass_vals.append(pass_at_k(ev.k, c, ev.k))
    k = ev.k
    return {
        "eval/greedy_acc": greedy_acc,
        f"eval/avg@{k}_mean": statistics.fmean(seed_accs),
        f"eval/avg@{k}_std": statistics.stdev(seed_accs) if len(seed_accs) > 1 else 0.0,
        f"eval/pass@{k}": statistics.fmean(pass_vals),
    }


def eval_settings(cfg: Config) -> dict[str, Any]:
    """Decoding settings, seeds and template recorded next to every result."""
    return {
        "num_problems": cfg.eval.num_problems,
        "k": cfg.eval.k,
        "seeds": list(cfg.eval.seeds),
        "temperature": cfg.eval.temperature,
        "greedy": True,
        "max_new_tokens": cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
        "system_prompt": cfg.data.system_prompt,
        "template": "tokenizer chat template (add_generation_prompt=True)",
        "reward": cfg.eval.reward,
    }
