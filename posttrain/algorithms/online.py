"""What every rollout-driven algorithm (GRPO family, REBEL, PPO, online DPO) shares: its
`RolloutSource` (weight sync, evaluation, resumable position) and the step's samples as tensors."""

from __future__ import annotations

from typing import Any

import torch

from posttrain.config import Config
from posttrain.data.tensors import pad_right
from posttrain.models import load_reference
from posttrain.models.vlm import image_tensors
from posttrain.rollout.source import Sample, SampleSource
from posttrain.runtime import distributed as dist
from posttrain.runtime.data_log import Drawn


def by_length(samples: list[Sample], indices: list[int]) -> list[int]:
    """`indices` ordered by sequence length (prompt + completion), longest first.

    Consecutive micro-batches then hold sequences of similar length, so little of each is padding
    (measured on the bench shape: 9.7k -> ~5k padded tokens per step at micro-batch 16). The order
    of samples within a step changes no gradient: every denominator is global over the step.
    """

    def length(i: int) -> int:
        return len(samples[i].rollout.prompt_ids) + len(samples[i].rollout.completion_ids)

    return sorted(indices, key=lambda i: -length(i))


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
        mask, adv, logp_roll: [N, L-1], aligned with next-token targets `input_ids[:, 1:]`;
        image prompts' tensors (`models.vlm.image_tensors`: `mm.*` [N, K, ...], `mm_count.*` [N]).
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
            sampled = s.rollout.completion_mask  # episodes: observation tokens get mask 0
            mask[i, start : start + n] = 1.0 if sampled is None else torch.tensor(sampled[:n])
        adv[i, start : start + n] = float(advantages[i])
        logp_roll[i, start : start + n] = torch.tensor(s.rollout.logprobs[:n], dtype=torch.float)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mask": mask,
        "adv": adv,
        "logp_roll": logp_roll,
        **image_tensors([s.rollout.images for s in samples]),
    }


def turn_tensors(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's per-turn rewards and progress, padded to the step's most turns K.

    A sample without turn data (a single-turn completion) is one turn without a turn reward.

    Returns:
        turn_rewards: [N, K] float64 (0 where the environment gave none, and at padding);
        progress: [N, K] float64 (NaN where none was reported, and at padding);
        n_turns: [N] long, >= 1.
    """
    n = [
        max(len(r.turn_rewards), len(r.turn_progress), 1 + max(r.turn_index or [0]))
        for r in (s.rollout for s in samples)
    ]
    K = max(n, default=1)
    rewards = torch.zeros(len(samples), K, dtype=torch.float64)
    progress = torch.full((len(samples), K), float("nan"), dtype=torch.float64)
    for i, s in enumerate(samples):
        for k, v in enumerate(s.rollout.turn_rewards):
            rewards[i, k] = 0.0 if v is None else float(v)
        for k, v in enumerate(s.rollout.turn_progress):
            progress[i, k] = float("nan") if v is None else float(v)
    return rewards, progress, torch.tensor(n, dtype=torch.long)


def turn_index_tensor(samples: list[Sample], width: int) -> torch.Tensor:
    """[N, width] long: each completion token's turn, aligned like `sequences_to_tensors`' mask
    (next-token targets); -1 at prompt and padding positions."""
    out = torch.full((len(samples), width), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        start, n = len(s.rollout.prompt_ids) - 1, len(s.rollout.completion_ids)
        turns = s.rollout.turn_index
        out[i, start : start + n] = 0 if turns is None else torch.tensor(turns[:n])
    return out


def mismatch_shares(
    stats: dict[str, torch.Tensor], token_total: float, seq_total: float | None = None
) -> dict[str, float]:
    """This micro-batch's shares of the rollout/trainer mismatch metrics (`tis/...`).

    Args:
        stats: `off_policy.mismatch_stats` (or `off_policy.rollout_correction`'s stats, which
            add the masked counts and `capped_count`).
        token_total: the step's global count of loss tokens.
        seq_total: the step's global count of samples with loss tokens (masked-sample share);
            None when `stats` has no masked counts.

    Returns:
        `tis/mismatch_abs_mean`, `tis/mismatch_kl_k3` (token means of |d| and of the k3 terms),
        `tis/mismatch_abs_max` (a maximum: `base.MAX_SUFFIX`) and, with masked counts,
        `tis/masked_token_frac`, `tis/masked_seq_frac`.
    """
    shares = {
        "tis/mismatch_abs_mean": float(stats["mismatch_abs_sum"]) / token_total,
        "tis/mismatch_abs_max": float(stats["mismatch_abs_max"]),
        "tis/mismatch_kl_k3": float(stats["mismatch_k3_sum"]) / token_total,
    }
    if "masked_token_count" in stats:
        assert seq_total is not None
        shares["tis/masked_token_frac"] = float(stats["masked_token_count"]) / token_total
        shares["tis/masked_seq_frac"] = float(stats["masked_seq_count"]) / seq_total
    return shares


def check_on_policy(groups: list[list[Sample]], version: int) -> None:
    """Raise unless every sample was drawn with the trainer's current weights (`version`).

    Raises:
        RuntimeError: naming the stale weight versions found.
    """
    stale = sorted({s.rollout.weight_version for g in groups for s in g} - {version})
    if stale:
        raise RuntimeError(
            f"advantage.estimator=opo trains exactly on-policy, but rollouts were sampled with "
            f"weight version(s) {stale} while the trainer's weights are version {version}; the "
            "rollout engine must receive the trainer's weights after every optimizer step"
        )


class OnlineAlgorithm:
    """What every rollout-driven algorithm (GRPO family, REBEL, PPO) shares: its `RolloutSource`.

    Subclasses add `make_batch` and `loss`; weight sync, evaluation and resumable state go through
    the source here. One level of inheritance, no deeper.

    Args:
        cfg: run config.
        source: prompts + rollout engine + rewards (shared with evaluation).
        ref_model: frozen reference for the KL term, or None when it is not needed.
    """

    rolls_out = True
    evaluates = True

    def __init__(self, cfg: Any, source: SampleSource, ref_model: Any | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self.ref_model = ref_model

    def after_step(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Push the new policy weights into the rollout engine (version = optimizer steps)."""
        return self.source.sync_weights(model, step)

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out accuracy with the current rollout weights."""
        return self.source.evaluate()

    def pass_counts(self, n: int) -> list[list[int]] | None:
        """[S][P] correct samples among n per held-out problem and seed, for the pass@k curve of
        the run's final report (None where the source does not sample single-turn answers)."""
        return self.source.pass_counts(n)

    def state_dict(self) -> dict[str, Any]:
        """Data position and weight version."""
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        self.source.load_state_dict(state)

    def drawn_rows(self) -> Drawn:
        """The prompts the last batch drew (`posttrain/runtime/data_log.py`)."""
        return self.source.drawn_rows()


def frozen_reference(cfg: Config, model_path: str) -> Any:
    """The frozen reference policy (`model.ref_path`, else the starting model) on this device."""
    ref = load_reference(cfg.model.ref_path or model_path, dtype=cfg.model.dtype)
    return ref.to(dist.device())
