"""Prompts -> rollout engine -> rewards -> scored groups, plus weight sync and evaluation.

Shared by every algorithm that samples (GRPO family now, PPO later). Every rank generates the
same full batch from the same seeds and trains on its own shard, so a 2-rank run sees exactly
the data of a 1-rank run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from posttrain import advantages as adv_fn
from posttrain import distributed as dist
from posttrain.algorithms.base import pad_right
from posttrain.checkpoint import full_state_dict
from posttrain.config import Config
from posttrain.data.chat import encode_prompts
from posttrain.data.stream import RowStream
from posttrain.eval import evaluate
from posttrain.rollout.engine import Rollout, SamplingConfig
from rewards import RewardSpec, score
from rewards.boundary import reward_metrics


@dataclass
class Sample:
    """One scored completion.

    Attributes:
        rollout: what the engine produced.
        reward: total reward after shaping, None when no reward could judge it.
        valid: whether the sample counts in the loss (reward known, not masked as truncated).
    """

    rollout: Rollout
    reward: float | None
    valid: bool


def sequences_to_tensors(
    samples: list[Sample], advantages: torch.Tensor, pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded training tensors for a list of samples.

    Args:
        samples: N scored samples.
        advantages: [N] sequence advantages, broadcast to every completion token.
        pad_id: token id used for padding.

    Returns:
        input_ids, attention_mask: [N, L] (prompt + completion);
        mask, adv, logp_roll: [N, L-1], aligned with next-token targets `input_ids[:, 1:]`.
    """
    ids = [s.rollout.prompt_ids + s.rollout.completion_ids for s in samples]
    input_ids = pad_right(ids, pad_id, torch.long)
    attention_mask = pad_right([[1] * len(x) for x in ids], 0, torch.long)
    width = input_ids.shape[1] - 1
    mask = torch.zeros(len(samples), max(width, 1))
    adv = torch.zeros_like(mask)
    logp_roll = torch.zeros_like(mask)
    for i, s in enumerate(samples):
        start, n = len(s.rollout.prompt_ids) - 1, len(s.rollout.completion_ids)
        if s.valid and n:
            mask[i, start : start + n] = 1.0
        adv[i, start : start + n] = float(advantages[i])
        logp_roll[i, start : start + n] = torch.tensor(s.rollout.logprobs[:n], dtype=torch.float)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mask": mask,
        "adv": adv,
        "logp_roll": logp_roll,
    }


class RolloutSource:
    """Owns the prompt stream, the rollout engine and the reward specs of a run.

    Args:
        cfg: run config.
        tokenizer: the policy tokenizer (chat template).
        engine: a RolloutEngine.
        train_rows, eval_rows: dataset rows with a prompt column and reward columns.
    """

    def __init__(
        self,
        cfg: Config,
        tokenizer: Any,
        engine: Any,
        train_rows: list[dict[str, Any]],
        eval_rows: list[dict[str, Any]],
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.engine = engine
        self.stream = RowStream(train_rows, seed=cfg.data.seed)
        self.eval_rows = eval_rows
        self.specs = [RewardSpec(r.name, r.weight, dict(r.kwargs)) for r in cfg.rewards]
        self.pad_id = int(tokenizer.pad_token_id)
        self.weight_version = 0

    def _sampling(self, step: int, round_: int) -> SamplingConfig:
        r = self.cfg.rollout
        seed = (self.cfg.train.seed * 1_000_003 + step * 101 + round_) % (2**31)
        return SamplingConfig(
            n=r.samples_per_prompt,
            temperature=r.temperature,
            top_p=r.top_p,
            max_new_tokens=r.max_new_tokens,
            seed=seed,
        )

    def _score_round(self, rows: list[dict[str, Any]], step: int, round_: int) -> tuple:
        cfg = self.cfg
        col = cfg.data.prompt_column
        prompts = [row[col] for row in rows]
        ids = encode_prompts(
            self.tokenizer, prompts, cfg.data.system_prompt, cfg.data.max_prompt_tokens
        )
        t0 = time.perf_counter()
        rollouts = self.engine.generate(ids, self._sampling(step, round_))
        t1 = time.perf_counter()
        G = cfg.rollout.samples_per_prompt
        rep = [rows[i // G] for i in range(len(rollouts))]
        columns = {k: [row[k] for row in rep] for k in rows[0] if k != col}
        result = score(
            self.specs,
            [row[col] for row in rep],
            [r.text for r in rollouts],
            columns,
            timeout_s=cfg.reward_timeout_s,
        )
        t2 = time.perf_counter()
        return rollouts, result, t1 - t0, t2 - t1

    def collect_groups(self, step: int) -> tuple[list[list[Sample]], dict[str, float]]:
        """Generate and score until `prompts_per_step` groups are ready (dynamic sampling)."""
        r = self.cfg.rollout
        G = r.samples_per_prompt
        kept: list[list[Sample]] = []
        dropped: list[list[Sample]] = []
        metrics: dict[str, float] = {"time/generate_s": 0.0, "time/reward_s": 0.0}
        all_samples: list[Sample] = []
        reward_stats: list[dict[str, float]] = []
        rounds = 0
        while len(kept) < r.prompts_per_step and rounds < max(1, r.max_generation_rounds):
            need = r.prompts_per_step - len(kept)
            rows = self.stream.take(need)
            rollouts, result, t_gen, t_rew = self._score_round(rows, step, rounds)
            rounds += 1
            metrics["time/generate_s"] += t_gen
            metrics["time/reward_s"] += t_rew
            stats = reward_metrics(result)
            correct = result.per_reward.get(self.cfg.eval.reward)
            if correct is not None:
                judged = [v for v in correct if v is not None]
                stats["accuracy"] = sum(v >= 1.0 for v in judged) / max(len(judged), 1)
            reward_stats.append(stats)
            samples = self._shape(rollouts, result.total)
            all_samples.extend(samples)
            for g in range(need):
                group = samples[g * G : (g + 1) * G]
                if r.filter_zero_variance_groups and not _informative(group):
                    dropped.append(group)
                else:
                    kept.append(group)
            if not r.filter_zero_variance_groups:
                break
        groups = kept + dropped[: r.prompts_per_step - len(kept)]
        metrics.update(_rollout_metrics(all_samples, reward_stats, self.cfg))
        metrics["sampling/rounds"] = float(rounds)
        metrics["sampling/dropped_groups"] = float(len(dropped))
        metrics["sampling/filled_uninformative_groups"] = float(max(0, len(groups) - len(kept)))
        return groups, metrics

    def _shape(self, rollouts: list[Rollout], totals: list[float | None]) -> list[Sample]:
        """Apply overlong shaping/masking; a None reward makes the sample invalid."""
        r = self.cfg.rollout
        out = []
        lengths = torch.tensor([len(x.completion_ids) for x in rollouts], dtype=torch.float)
        penalty = adv_fn.overlong_penalty(lengths, r.max_new_tokens, r.overlong_buffer)
        for i, (ro, total) in enumerate(zip(rollouts, totals, strict=True)):
            reward = total
            if reward is not None and r.overlong_penalty:
                reward = reward + float(penalty[i])
            truncated = ro.finish_reason == "length"
            valid = reward is not None and not (r.mask_truncated and truncated)
            out.append(Sample(ro, reward, valid))
        return out

    # ----------------------------------------------------------- weights
    def sync_weights(self, model: Any, version: int) -> dict[str, float]:
        """Push the trainer's current weights into the rollout engine."""
        t0 = time.perf_counter()
        weights = full_state_dict(model)
        self.engine.load_weights(iter(weights.items()), version)
        self.weight_version = version
        return {"time/sync_s": time.perf_counter() - t0, "weight_version": float(version)}

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy (greedy and avg@k) with the engine's current weights."""
        return evaluate(self.engine, self.tokenizer, self.eval_rows, self.cfg)

    def state_dict(self) -> dict[str, Any]:
        """Resumable position."""
        return {"stream": self.stream.state_dict(), "weight_version": self.weight_version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore position and version."""
        self.stream.load_state_dict(state["stream"])
        self.weight_version = int(state["weight_version"])


def _informative(group: list[Sample]) -> bool:
    vals = [s.reward for s in group if s.valid]
    return len(vals) >= 2 and max(vals) > min(vals)


def _rollout_metrics(
    samples: list[Sample], reward_stats: list[dict[str, float]], cfg: Config
) -> dict[str, float]:
    rewards = torch.tensor([s.reward for s in samples if s.reward is not None])
    lengths = torch.tensor([len(s.rollout.completion_ids) for s in samples], dtype=torch.float)
    out = dict(reward_stats[-1]) if reward_stats else {}
    for stats in reward_stats[:-1]:  # error counts add up over dynamic-sampling rounds
        for key, value in stats.items():
            if "/errors/" in key or key == "reward/masked_count":
                out[key] = out.get(key, 0.0) + value
    out["reward/mean"] = float(rewards.mean()) if rewards.numel() else float("nan")
    out["reward/std"] = float(rewards.std()) if rewards.numel() > 1 else 0.0
    out["samples/masked"] = float(sum(not s.valid for s in samples))
    out["samples/reward_none"] = float(sum(s.reward is None for s in samples))
    out["samples/truncated"] = float(sum(s.rollout.finish_reason == "length" for s in samples))
    out["response_length/mean"] = float(lengths.mean()) if lengths.numel() else 0.0
    out["response_length/max"] = float(lengths.max()) if lengths.numel() else 0.0
    out["tokens/generated"] = float(lengths.sum())
    if dist.world_size() > 1:
        out["ranks"] = float(dist.world_size())
    return out
