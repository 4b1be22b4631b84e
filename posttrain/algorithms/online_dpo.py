"""Online DPO (`train.algorithm: online_dpo`): preference pairs sampled by the rollout engine,
labelled by the configured rewards, trained with the DPO-family loss.

make_batch: `rollout.samples_per_prompt` (>= 2) completions of each of the step's
`rollout.prompts_per_step` prompts are sampled and scored (`RolloutSource`, as GRPO/REBEL). Per
prompt, chosen = the highest-reward valid sample, rejected = the lowest (first in sample order on
ties within the max or the min); a prompt whose valid rewards all tie is skipped and counted in
`pairs/skipped_ties`, one with fewer than two valid samples in `pairs/skipped_invalid`. The
samples' answer accuracy (GRPO's `accuracy`) is logged as `rollout/accuracy`: `accuracy` is DPO's
implicit-reward accuracy, as in `train.algorithm: dpo`. The pairs
are laid out as DPO lays them out (one forward over chosen rows then rejected rows per
micro-batch of `micro_batch_size_per_device` pairs) with reference sequence log-probs from a
frozen copy of the starting policy (`model.ref_path`, else the model after the SFT warm-up; none
for `dpo.loss: simpo`).
loss: the DPO family's per-pair loss (`dpo.loss`, `dpo.beta`, `dpo.label_smoothing`,
`dpo.simpo_gamma`, `dpo.nll_coef`: the same `losses` calls as `posttrain/algorithms/dpo.py`),
summed and divided by the step's pair count over all ranks. Weights are synced into the rollout
engine after every step; evaluation is the rollout family's held-out greedy/avg@k accuracy.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from posttrain.algorithms.base import StepBatch
from posttrain.algorithms.dpo import ReferenceLogps
from posttrain.algorithms.dpo import pair_losses as dpo_pair_losses
from posttrain.algorithms.online import OnlineAlgorithm, frozen_reference
from posttrain.config import Config
from posttrain.data.preference import EncodedPair, pair_batch
from posttrain.data.tensors import chunk_indices, shard_for_rank
from posttrain.models.lean_logprobs import install_lean_forward
from posttrain.rollout.factory import make_rollout_source
from posttrain.rollout.source import Sample, SampleSource
from posttrain.runtime import distributed as dist


def select_pairs(groups: list[list[Sample]]) -> tuple[list[tuple[int, int, int]], dict[str, int]]:
    """Chosen / rejected sample of every group: the highest and the lowest valid reward.

    Args:
        groups: the step's scored groups (the samples of one prompt each).

    Returns:
        ([(group index, chosen index, rejected index)] in group order, counts `used`, `ties`
        (>= 2 valid samples, all with the same reward) and `invalid` (< 2 valid samples)).
    """
    pairs: list[tuple[int, int, int]] = []
    counts = {"used": 0, "ties": 0, "invalid": 0}
    for g, group in enumerate(groups):
        valid = [
            (i, float(s.reward)) for i, s in enumerate(group) if s.valid and s.reward is not None
        ]
        if len(valid) < 2:
            counts["invalid"] += 1
            continue
        best = max(valid, key=lambda x: x[1])  # max/min return the first of equal items
        worst = min(valid, key=lambda x: x[1])
        if best[1] == worst[1]:
            counts["ties"] += 1
            continue
        pairs.append((g, best[0], worst[0]))
        counts["used"] += 1
    return pairs, counts


def sample_pair(chosen: Sample, rejected: Sample, index: int = 0) -> EncodedPair:
    """An `EncodedPair` of two sampled completions of the same prompt (mask = completion)."""

    def encode(s: Sample) -> tuple[tuple[int, ...], tuple[int, ...]]:
        p, c = list(s.rollout.prompt_ids), list(s.rollout.completion_ids)
        return tuple(p + c), tuple([0] * len(p) + [1] * len(c))

    (w_ids, w_mask), (l_ids, l_mask) = encode(chosen), encode(rejected)
    return EncodedPair(index, w_ids, w_mask, l_ids, l_mask)


class OnlineDPO(OnlineAlgorithm):
    """The online DPO algorithm object the trainer drives.

    Args:
        cfg: run config (`dpo.*`, `rollout.*`, `rewards`).
        source: prompts + rollout engine + rewards (shared with evaluation).
        ref_model: frozen reference (the starting policy), None for `dpo.loss: simpo`.
    """

    def __init__(self, cfg: Config, source: SampleSource, ref_model: Any | None = None) -> None:
        super().__init__(cfg, source, ref_model)
        self.ref = None if ref_model is None else ReferenceLogps(source.pad_id, model=ref_model)

    # --------------------------------------------------------------- batch
    def make_batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        """Sample and score the step's groups; this rank's pairs in DPO micro-batches."""
        cfg = self.cfg
        groups, metrics = self.source.collect_groups(step, model)
        if "accuracy" in metrics:  # the samples' answer accuracy; `accuracy` is DPO's (loss)
            metrics["rollout/accuracy"] = metrics.pop("accuracy")
        mine = shard_for_rank(len(groups), dist.rank(), dist.world_size())
        pairs, counts = select_pairs([groups[g] for g in mine])
        total_pairs = max(dist.all_reduce_sum(float(len(pairs))), 1.0)  # the loss denominator
        encoded = [
            sample_pair(groups[mine[g]][w], groups[mine[g]][l], mine[g]) for g, w, l in pairs
        ]
        weight = [1.0] * len(encoded)
        if not encoded:  # no pair on this rank: one zero-weight pair keeps the ranks in step
            s = groups[mine[0]][0]
            encoded, weight = [sample_pair(s, s, mine[0])], [0.0]
        t0 = time.perf_counter()
        micro = []
        for idx in chunk_indices(len(encoded), cfg.train.micro_batch_size_per_device):
            mb = pair_batch([encoded[i] for i in idx], self.source.pad_id)
            del mb["margin"]
            mb["pair_weight"] = torch.tensor([weight[i] for i in idx])
            if self.ref is not None:
                ref = self.ref.train_logps(idx, mb)  # [m, 2], on the fly
                mb["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
            micro.append(mb)
        metrics["time/ref_logprob_s"] = time.perf_counter() - t0
        metrics["pairs/used"] = dist.all_reduce_sum(float(counts["used"]))
        metrics["pairs/skipped_ties"] = dist.all_reduce_sum(float(counts["ties"]))
        metrics["pairs/skipped_invalid"] = dist.all_reduce_sum(float(counts["invalid"]))
        return StepBatch(
            micro, metrics, updates=cfg.train.updates_per_batch, denominator=total_pairs
        )

    # ---------------------------------------------------------------- loss
    def loss(
        self, outputs: Any, mb: dict[str, torch.Tensor], batch: StepBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum of this micro-batch's pair losses / pairs of the whole step, and metric shares."""
        loss, met = dpo_pair_losses(outputs, mb, self.cfg.dpo)
        w = mb["pair_weight"].to(loss.device)
        n = batch.denominator

        def share(x: torch.Tensor) -> float:
            return float((x.to(w.device) * w).sum()) / n

        shares = {
            "rewards/chosen": share(met["rewards_chosen"]),
            "rewards/rejected": share(met["rewards_rejected"]),
            "margin": share(met["margin"]),
            "accuracy": share(met["accuracy"]),
        }
        if "nll" in met:
            shares["nll"] = share(met["nll"])
        return (loss * w).sum() / n, shares


def build_online_dpo(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> OnlineDPO:
    """Rollout source, frozen reference (the starting policy) and the OnlineDPO object."""
    source = make_rollout_source(cfg, model_path, tokenizer)
    ref = frozen_reference(cfg, model_path) if cfg.dpo.loss != "simpo" else None
    install_lean_forward(engine, cfg.train.logprob_chunk_tokens)
    install_lean_forward(ref, cfg.train.logprob_chunk_tokens)
    return OnlineDPO(cfg, source, ref)
