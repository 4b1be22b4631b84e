"""Guide's generation round in the rollout source (docs/algorithms.md, "Guide").

After a round is scored, the groups whose samples all fail (`guidance.all_fail_groups`) are
sampled again with a hint in the prompt, all in one engine call, `guide.replace` completions per
group with the round's sampling settings. Each hinted completion becomes a sample of the
UNHINTED prompt: its rollout keeps the unhinted prompt ids, the sampled ids and the engine's
log-probs (taken in the hinted context, so `logp_roll` is the behaviour policy's), and
`Sample.hint_prompt_ids` records the hinted prompt the trainer recomputes `logp_old` with
(`posttrain/algorithms/grpo.py`). It is scored against the same row and replaces a failed sample
of the group (`guidance.replacement_slots`); the advantages are then computed over the group as
it is after the replacement.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from posttrain.config import Config
from posttrain.data.chat import encode_prompts
from posttrain.errors import ConfigError
from posttrain.guidance import (
    HINT_FUNCTIONS,
    all_fail_groups,
    hinted_prompt,
    replace_samples,
    replacement_slots,
    spread_indices,
)
from posttrain.runtime import distributed as dist

# generate(prompt_ids) -> rollouts (len(prompt_ids) * guide.replace, prompt-major)
Generate = Callable[[list[list[int]]], list[Any]]
# score(rollouts, rows) -> shaped samples, one per rollout (the row it is scored against)
Score = Callable[[list[Any], list[dict[str, Any]]], list[Any]]


def row_hint(row: dict[str, Any], cfg: Config) -> str:
    """The row's hint: `guide.hint_fn` of the row, else its `guide.hint_column` value.

    Raises:
        ConfigError: the hint function cannot hint the row, or the column is missing or empty.
    """
    g = cfg.guide
    if g.hint_fn is not None:
        try:
            return HINT_FUNCTIONS[g.hint_fn](row)
        except ValueError as err:
            raise ConfigError(f"guide.hint_fn={g.hint_fn}: {err}") from None
    hint = row.get(g.hint_column)
    if hint is None or not str(hint).strip():
        columns = ", ".join(sorted(row))
        raise ConfigError(
            f"guide.hint_column={g.hint_column!r}: a row has no hint there (its columns: "
            f"{columns}); add the column, name another, or set guide.hint_fn (one of "
            f"{', '.join(HINT_FUNCTIONS)})"
        )
    return str(hint)


def hinted_prompts(rows: list[dict[str, Any]], cfg: Config) -> list[Any]:
    """Each row's prompt with its hint placed by `guide.hint_template`."""
    col, template = cfg.data.prompt_column, cfg.guide.hint_template
    return [hinted_prompt(row[col], template, row_hint(row, cfg)) for row in rows]


def hint_warmup_rows(rows: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """The SFT rows followed by hinted copies of `guide.warmup_hinted` of them (spread evenly):
    the same target with the hinted prompt (`guide.hint_template`), so that a warm-up teaches the
    model to read hints without losing any unhinted row. At share 0 the rows are returned as
    they are."""
    share = cfg.guide.warmup_hinted
    if share <= 0:
        return rows
    col, template = cfg.data.prompt_column, cfg.guide.hint_template
    hinted = [
        {**rows[i], col: hinted_prompt(rows[i][col], template, row_hint(rows[i], cfg))}
        for i in spread_indices(len(rows), share)
    ]
    return [*rows, *hinted]


def encode_hinted(tokenizer: Any, rows: list[dict[str, Any]], cfg: Config) -> list[list[int]]:
    """The hinted prompts' token ids (chat template, `data.system_prompt`).

    Raises:
        ConfigError: a row cannot be hinted, or its hinted prompt is longer than
            `data.max_prompt_tokens` (the engine's context holds no more).
    """
    d = cfg.data
    try:
        return encode_prompts(
            tokenizer, hinted_prompts(rows, cfg), d.system_prompt, d.max_prompt_tokens
        )
    except ConfigError as err:
        raise ConfigError(
            f"guide: a hinted prompt does not fit: {err} (guide.hint_template adds the hint to "
            "every prompt)"
        ) from None


def check_hints(cfg: Config, tokenizer: Any, row_lists: list[list[dict[str, Any]]]) -> None:
    """Fail before training on a training row that cannot be hinted or whose hinted prompt is
    longer than `data.max_prompt_tokens` (not at the step that first needs its hint)."""
    for rows in row_lists:
        encode_hinted(tokenizer, rows, cfg)


def group_tensors(groups: list[list[Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[P, G] rewards (NaN where unknown) and validity of scored groups of samples."""
    rewards = torch.tensor(
        [[math.nan if s.reward is None else float(s.reward) for s in g] for g in groups],
        dtype=torch.float64,
    )
    valid = torch.tensor([[bool(s.valid) for s in g] for g in groups], dtype=torch.bool)
    return rewards, valid


def guide_groups(
    cfg: Config,
    tokenizer: Any,
    groups: list[list[Any]],
    rows: list[dict[str, Any]],
    generate: Generate,
    score: Score,
) -> tuple[list[list[Any]], dict[str, float]]:
    """One Guide round over a scored round's groups.

    Args:
        cfg: run config (`guide.*`, `data.*`).
        tokenizer: the policy tokenizer (chat template).
        groups: P scored groups of G samples (`Sample`s), the round's order.
        rows: the P dataset rows the groups were sampled for.
        generate: samples `guide.replace` completions for each hinted prompt.
        score: scores and shapes rollouts against rows (as the round's samples were).

    Returns:
        The groups with hinted samples in place of failed ones (with `guide.enabled`; else as
        given) and counts: `all_fail` (groups with no successful sample before hints),
        `groups`, `hinted` (hinted samples), `hinted_success`, `hinted_reward_sum` and
        `hinted_known` (the sum and count of their known rewards).
    """
    g = cfg.guide
    rewards, valid = group_tensors(groups)
    fail = all_fail_groups(rewards, valid, g.success_threshold).tolist()
    if g.enabled and dist.world_size() > 1:
        # every rank scored the same groups, but a reward can differ between ranks (a timeout,
        # a sampled judge): agree on the hinted groups, since generate() may be a collective
        fail = [f > 0 for f in dist.all_reduce_max_list([float(f) for f in fail])]
    idx = [i for i, f in enumerate(fail) if f]
    stats = {"all_fail": float(len(idx)), "groups": float(len(groups)), "hinted": 0.0}
    stats.update(hinted_success=0.0, hinted_reward_sum=0.0, hinted_known=0.0)
    if not g.enabled or not idx:
        return groups, stats
    k = g.replace or len(groups[0])
    hint_ids = encode_hinted(tokenizer, [rows[i] for i in idx], cfg)
    rollouts = generate(hint_ids)
    if len(rollouts) != len(idx) * k:
        raise RuntimeError(
            f"guide: the engine returned {len(rollouts)} rollouts, not {len(idx) * k}"
        )
    as_unhinted = []
    for j, ro in enumerate(rollouts):
        base = groups[idx[j // k]][0].rollout  # the group's unhinted prompt
        as_unhinted.append(
            dataclasses.replace(
                ro, prompt_index=base.prompt_index, prompt_ids=list(base.prompt_ids)
            )
        )
    samples = score(as_unhinted, [rows[idx[j // k]] for j in range(len(rollouts))])
    for j, s in enumerate(samples):
        s.hint_prompt_ids = list(hint_ids[j // k])
    slots = replacement_slots(rewards[idx], valid[idx], k).tolist()
    out = list(groups)
    for n, i in enumerate(idx):
        out[i] = replace_samples(groups[i], samples[n * k : (n + 1) * k], slots[n])
    h_rewards, h_valid = group_tensors([samples])
    stats["hinted"] = float(len(samples))
    stats["hinted_success"] = float((h_valid & (h_rewards >= g.success_threshold)).sum())
    stats["hinted_reward_sum"] = float(torch.nan_to_num(h_rewards, nan=0.0).sum())
    stats["hinted_known"] = float((~torch.isnan(h_rewards)).sum())
    return out, stats


def guide_metrics(totals: dict[str, float], enabled: bool) -> dict[str, float]:
    """A step's `guide/*` metrics from its rounds' summed `guide_groups` counts.

    `guide/all_fail_groups`: the share of the step's scored groups (all generation rounds) with
    no successful sample before any hint (logged with guide off too). With guide on:
    `guide/hinted_samples` (count), `guide/hinted_success` (share of hinted samples that
    succeeded; NaN without any) and `guide/hinted_reward_mean` (their mean known reward).
    """
    groups = max(totals.get("groups", 0.0), 1.0)
    out = {"guide/all_fail_groups": totals.get("all_fail", 0.0) / groups}
    if enabled:
        n, known = totals.get("hinted", 0.0), totals.get("hinted_known", 0.0)
        out["guide/hinted_samples"] = n
        out["guide/hinted_success"] = totals.get("hinted_success", 0.0) / n if n else math.nan
        reward_sum = totals.get("hinted_reward_sum", 0.0)
        out["guide/hinted_reward_mean"] = reward_sum / known if known else math.nan
    return out
