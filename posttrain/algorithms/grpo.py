"""GRPO and its critic-free family (Dr. GRPO, DAPO options, GSPO, RLOO, REINFORCE++, OPO).

make_batch: prompts -> rollout engine (G samples each) -> rewards -> advantages -> tensors.
loss: the clipped surrogate (token or sequence ratio), TIS correction, KL and entropy terms,
aggregated with whole-step denominators. All math lives in `posttrain.losses` and
`posttrain.advantages`; this file only wires it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from posttrain import advantages as adv_fn
from posttrain import distributed as dist
from posttrain import losses
from posttrain.algorithms.base import StepBatch, chunk_indices, pad_right, shard_for_rank
from posttrain.algorithms.rollout_batch import RolloutSource, sequences_to_tensors
from posttrain.config import Config


class GRPO:
    """The GRPO-family algorithm object the trainer drives.

    Args:
        cfg: run config.
        source: prompts + rollout engine + rewards (shared with evaluation).
        ref_model: frozen reference for the KL term, or None when `kl.coef == 0`.
    """

    def __init__(self, cfg: Config, source: RolloutSource, ref_model: Any | None) -> None:
        self.cfg = cfg
        self.source = source
        self.ref_model = ref_model
        self.denominator = 1.0
        self.token_total = 1.0
        self.recompute_old = cfg.train.updates_per_batch > 1

    # --------------------------------------------------------------- batch
    def make_batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        """Generate, score and turn one step's groups into micro-batches for this rank."""
        cfg = self.cfg
        groups, metrics = self.source.collect_groups(step)
        P, G = len(groups), cfg.rollout.samples_per_prompt
        rewards = torch.tensor(
            [[s.reward if s.reward is not None else 0.0 for s in g] for g in groups]
        )
        valid = torch.tensor([[s.valid for s in g] for g in groups])
        lengths = torch.tensor([[len(s.rollout.completion_ids) for s in g] for g in groups])
        seq_adv = adv_fn.sequence_advantages(
            rewards.float(),
            valid,
            cfg.advantage.estimator,
            eps=cfg.advantage.eps,
            lengths=lengths.float(),
        )
        flat = [s for g in groups for s in g]
        mine = shard_for_rank(P * G, dist.rank(), dist.world_size())
        seqs = [flat[i] for i in mine]
        t = sequences_to_tensors(seqs, seq_adv.reshape(-1)[mine], self.source.pad_id)
        denom_local = losses.aggregation_denominator(t["mask"], cfg.loss.aggregation)
        self.denominator = max(dist.all_reduce_sum(denom_local), 1.0)
        self.token_total = max(dist.all_reduce_sum(float(t["mask"].sum())), 1.0)
        t0 = time.perf_counter()
        if self.recompute_old or cfg.kl.coef > 0 or cfg.advantage.entropy_modulation:
            self._add_old_and_ref(t, model)
        metrics["time/logprob_s"] = time.perf_counter() - t0
        if cfg.advantage.entropy_modulation:
            t["adv"] = adv_fn.entropy_modulation(
                t["adv"], t["entropy_old"], t["mask"], cfg.advantage.entropy_modulation
            )
        size = cfg.train.micro_batch_size_per_device
        micro = [{k: v[idx] for k, v in t.items()} for idx in chunk_indices(len(seqs), size)]
        micro = [_trim(mb) for mb in micro]
        metrics["advantage/abs_mean"] = float(seq_adv[valid].abs().mean()) if valid.any() else 0.0
        return StepBatch(micro, metrics, updates=cfg.train.updates_per_batch)

    @torch.no_grad()
    def _add_old_and_ref(self, t: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
        """Fill logp_old / entropy_old (current policy) and logp_ref, without grad."""
        temp = self.cfg.rollout.temperature
        size = self.cfg.train.micro_batch_size_per_device
        olds, ents, refs = [], [], []
        for idx in chunk_indices(t["input_ids"].shape[0], size):
            ids, att = t["input_ids"][idx], t["attention_mask"][idx]
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
            olds.append(losses.token_logprobs(logits, ids[:, 1:], temp))
            ents.append(losses.token_entropy(logits, temp))
            if self.ref_model is not None:
                ref_logits = self.ref_model(input_ids=ids, attention_mask=att).logits[:, :-1]
                refs.append(losses.token_logprobs(ref_logits, ids[:, 1:], temp))
        t["logp_old"] = torch.cat(olds)
        t["entropy_old"] = torch.cat(ents)
        if refs:
            t["logp_ref"] = torch.cat(refs)

    # ---------------------------------------------------------------- loss
    def loss(
        self, outputs: Any, mb: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step loss and metrics."""
        cfg, lc = self.cfg, self.cfg.loss
        logits = outputs.logits[:, :-1]
        logp = losses.token_logprobs(logits, mb["input_ids"][:, 1:], cfg.rollout.temperature)
        mask = mb["mask"]
        logp_old = mb["logp_old"] if "logp_old" in mb else logp.detach()
        loss_tok, stats = losses.policy_loss(
            logp,
            logp_old,
            mb["adv"],
            mask,
            clip_low=lc.clip_low,
            clip_high=lc.clip_high,
            dual_clip_c=lc.dual_clip_c,
            ratio_level=lc.ratio_level,
        )
        d, n_tok = self.denominator, self.token_total
        shares: dict[str, float] = {}
        mismatch = (logp_old - mb["logp_roll"]).abs() * mask
        shares["tis/mismatch_abs_mean"] = float(mismatch.sum()) / n_tok
        if lc.tis_cap is not None:
            w, tis = losses.tis_weights(logp_old, mb["logp_roll"], mask, lc.tis_cap)
            loss_tok = loss_tok * w
            shares["tis/capped_frac"] = float(tis["capped_count"]) / n_tok
        if cfg.kl.coef > 0:
            kl = losses.kl_estimate(logp, mb["logp_ref"], cfg.kl.estimator)
            loss_tok = loss_tok + cfg.kl.coef * kl
            shares["kl"] = float((kl.detach() * mask).sum()) / n_tok
        if lc.entropy_coef:
            entropy = losses.token_entropy(logits, cfg.rollout.temperature)
            loss_tok = loss_tok - lc.entropy_coef * entropy
        else:  # metric only: no graph through the [b, T, V] entropy
            with torch.no_grad():
                entropy = losses.token_entropy(logits.detach(), cfg.rollout.temperature)
        shares["entropy"] = float((entropy.detach() * mask).sum()) / n_tok
        shares["clip_frac"] = float((stats["clipped"].float() * mask).sum()) / n_tok
        loss = losses.aggregate(loss_tok, mask, lc.aggregation, d, cfg.rollout.max_new_tokens)
        return loss, shares

    # ---------------------------------------------------------- lifecycle
    def after_step(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Push the new weights into the rollout engine (version = optimizer steps so far)."""
        return self.source.sync_weights(model, step)

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out accuracy with the current rollout weights."""
        return self.source.evaluate()

    def state_dict(self) -> dict[str, Any]:
        """Data position and weight version."""
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        self.source.load_state_dict(state)


def _trim(mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut a micro-batch's right padding to its own longest sequence."""
    width = int(mb["attention_mask"].sum(dim=1).max())
    out = {}
    for k, v in mb.items():
        if v.dim() == 2:
            out[k] = v[:, :width] if k in ("input_ids", "attention_mask") else v[:, : width - 1]
        else:
            out[k] = v
    return out


__all__ = ["GRPO", "pad_right"]
