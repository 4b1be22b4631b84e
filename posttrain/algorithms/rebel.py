"""REBEL: Reinforcement Learning via Regressing Relative Rewards (Gao et al. 2024).

For every pair (i, j) of samples of the same prompt, regress the difference of the policy's
sequence log-ratios onto the difference of their rewards:

    loss_ij = ((1/eta) [(logp_i - logp_old_i) - (logp_j - logp_old_j)] - (R_i - R_j))^2

with sequence log-probs (sum over completion tokens) and logp_old the trainer's policy at the start
of the step (no grad). The step loss is the mean over all valid pairs of the step (all
micro-batches, all ranks), so micro-batching does not change the gradient. Generation, rewards,
weight sync and evaluation are the GRPO family's (`RolloutSource`); the batching helpers are
shared too. Each micro-batch holds whole groups (`micro_batch_size_per_device` is a multiple of
`samples_per_prompt`, checked by the config), so both members of every pair are in it.
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain import losses, off_policy
from posttrain.algorithms.base import StepBatch, trim_micro_batch
from posttrain.algorithms.online import OnlineAlgorithm, mismatch_shares, sequences_to_tensors
from posttrain.config import Config
from posttrain.data.tensors import chunk_indices, shard_for_rank
from posttrain.models.forward import policy_token_stats
from posttrain.models.lean_logprobs import install_lean_forward, output_token_stats
from posttrain.rollout.factory import make_rollout_source
from posttrain.rollout.source import Sample, SampleSource
from posttrain.runtime import distributed as dist


class Rebel(OnlineAlgorithm):
    """The REBEL algorithm object the trainer drives.

    Args:
        cfg: run config (`rebel.eta`, `rollout.*`, `train.updates_per_batch`).
        source: prompts + rollout engine + rewards (shared with GRPO and evaluation).
    """

    def __init__(self, cfg: Config, source: SampleSource) -> None:
        super().__init__(cfg, source)

    # --------------------------------------------------------------- batch
    def make_batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        """Generate and score one step's groups; cut this rank's groups into micro-batches."""
        cfg = self.cfg
        groups, metrics = self.source.collect_groups(step, model)
        G = cfg.rollout.samples_per_prompt
        mine = shard_for_rank(len(groups), dist.rank(), dist.world_size())
        t = group_tensors([groups[g] for g in mine], self.source.pad_id)
        valid = t["valid"].reshape(-1, G)
        n_pairs = losses.rebel_pairs(len(mine), G, valid).shape[0]
        num_pairs = max(dist.all_reduce_sum(float(n_pairs)), 1.0)  # the loss denominator
        token_total = max(dist.all_reduce_sum(float(t["mask"].sum())), 1.0)
        size = cfg.train.micro_batch_size_per_device  # a multiple of G: whole groups
        if cfg.train.updates_per_batch > 1:  # with one update, logp_old == logp.detach()
            t["logp_old"] = policy_token_stats(model, t, cfg.rollout.temperature, size)["logp_old"]
        n = t["input_ids"].shape[0]
        micro = [
            trim_micro_batch({k: v[idx] for k, v in t.items()}) for idx in chunk_indices(n, size)
        ]
        metrics["rebel/pairs"] = num_pairs
        return StepBatch(
            micro,
            metrics,
            updates=cfg.train.updates_per_batch,
            denominator=num_pairs,
            token_total=token_total,
        )

    # ---------------------------------------------------------------- loss
    def loss(
        self, outputs: Any, mb: dict[str, torch.Tensor], batch: StepBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share: sum of its pairs' REBEL losses / pairs of the whole step.

        Args:
            outputs: the model's forward output: `lean` (chunked log-probs) or `logits`
                [b, W, V].
            mb: `input_ids` [b, W], `mask`/`logp_roll` (and `logp_old`) [b, W-1], `reward` and
                `valid` [b]; b is a multiple of `samples_per_prompt` (whole groups).
            batch: the step's batch (`denominator` = valid pairs, `token_total`, all ranks).
        """
        cfg = self.cfg
        temp = cfg.rollout.temperature
        logp, entropy = output_token_stats(outputs, mb["input_ids"], temp, entropy="metric")
        mask = mb["mask"].to(logp.device)
        logp_old = mb["logp_old"].to(logp.device) if "logp_old" in mb else logp.detach()
        G, eta = cfg.rollout.samples_per_prompt, cfg.rebel.eta
        per_pair, seq_lr = rebel_micro_batch_loss(
            logp, logp_old, mask, mb["reward"], mb["valid"], group_size=G, eta=eta
        )
        num_pairs, n_tok = batch.denominator, batch.token_total
        loss = per_pair.sum() / num_pairs
        mismatch = off_policy.mismatch_stats(logp_old, mb["logp_roll"].to(logp.device), mask)
        shares = {
            "entropy": float((entropy * mask).sum()) / n_tok,
            **mismatch_shares(mismatch, n_tok),
            "rebel/residual_abs_mean": float(per_pair.detach().sqrt().sum()) / num_pairs,
            "rebel/pair_logratio_abs_mean": float(seq_lr.abs().sum()) / num_pairs,
        }
        return loss, shares


def group_tensors(groups: list[list[Sample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Training tensors of whole groups, in group-major order.

    Returns:
        `input_ids`, `attention_mask` [N, L]; `mask`, `logp_roll` [N, L-1] (see
        `sequences_to_tensors`); `reward` [N] float (0 where None) and `valid` [N] bool.
    """
    flat = [s for g in groups for s in g]
    t = sequences_to_tensors(flat, torch.zeros(len(flat)), pad_id)
    del t["adv"]
    t["reward"] = torch.tensor([s.reward if s.reward is not None else 0.0 for s in flat])
    t["valid"] = torch.tensor([s.valid for s in flat], dtype=torch.bool)
    return t


def rebel_micro_batch_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    valid: torch.Tensor,
    group_size: int,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair REBEL losses of a micro-batch of whole groups.

    Args:
        logp: [b, T] token log-probs under the current policy (with grad).
        logp_old: [b, T] token log-probs under the step's old policy.
        mask: [b, T] 1 at the completion tokens of valid samples.
        rewards: [b] scalar rewards.
        valid: [b] bool; pairs touching an invalid sample are dropped.
        group_size: G; b must be a multiple of it (samples of a group are consecutive).
        eta: REBEL step size.

    Returns:
        ([M] per-pair losses, [M] detached pair differences of sequence log-ratios).
    """
    b = logp.shape[0]
    if b % group_size:
        raise ValueError(f"micro-batch of {b} samples does not hold whole groups of {group_size}")
    m = mask.to(logp.dtype)
    seq_logp = (logp * m).sum(-1)  # [b]
    seq_old = (logp_old.to(logp.dtype) * m).sum(-1)
    pairs = losses.rebel_pairs(b // group_size, group_size, valid.reshape(-1, group_size))
    per_pair = losses.rebel_loss(seq_logp, seq_old, rewards.to(logp.device), eta, pairs)
    lr = (seq_logp - seq_old).detach()
    pairs = pairs.to(lr.device)
    return per_pair, lr[pairs[:, 0]] - lr[pairs[:, 1]]


def build_rebel(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> Rebel:
    """REBEL over a rollout source."""
    install_lean_forward(engine, cfg.train.logprob_chunk_tokens)
    return Rebel(cfg, make_rollout_source(cfg, model_path, tokenizer))
