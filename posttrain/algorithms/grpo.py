"""GRPO and its critic-free family (Dr. GRPO, DAPO options, GSPO, RLOO, REINFORCE++, OPO).

make_batch: prompts -> rollout engine (G samples each) -> rewards -> advantages -> tensors.
loss: the clipped surrogate (token or sequence ratio), the rollout correction (TIS by default),
KL and entropy terms, aggregated with whole-step denominators. All math lives in
`posttrain.losses`, `posttrain.off_policy` and `posttrain.advantages`; this file only wires it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from posttrain import advantages as adv_fn
from posttrain import guidance, losses, off_policy
from posttrain import turn_credit as turn_fn
from posttrain.algorithms.base import StepBatch, split_micro_batches
from posttrain.algorithms.online import (
    OnlineAlgorithm,
    by_length,
    check_on_policy,
    frozen_reference,
    mismatch_shares,
    sequences_to_tensors,
    turn_index_tensor,
    turn_tensors,
)
from posttrain.config import Config
from posttrain.data.tensors import pad_right, shard_for_rank
from posttrain.models.forward import policy_token_stats
from posttrain.models.lean_logprobs import install_lean_forward, output_token_stats
from posttrain.rollout.factory import make_rollout_source
from posttrain.rollout.source import Sample, SampleSource
from posttrain.runtime import distributed as dist
from posttrain.runtime import phase_trace


class GRPO(OnlineAlgorithm):
    """The GRPO-family algorithm object the trainer drives.

    Args:
        cfg: run config.
        source: prompts + rollout engine + rewards (shared with evaluation).
        ref_model: frozen reference for the KL term, or None when `kl.coef == 0`.
    """

    def __init__(self, cfg: Config, source: SampleSource, ref_model: Any | None) -> None:
        super().__init__(cfg, source, ref_model)
        # step-start policy log-probs / entropies: the loss needs them with several updates per
        # batch (else its detached current ones are the same), EMPG needs the entropies
        self.needs_old = cfg.train.updates_per_batch > 1 or bool(cfg.advantage.entropy_modulation)

    # --------------------------------------------------------------- batch
    def make_batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        """Generate, score and turn one step's groups into micro-batches for this rank."""
        cfg = self.cfg
        groups, metrics = self.source.collect_groups(step, model)
        if cfg.advantage.estimator == "opo":  # OPO is exactly on-policy: one update per batch
            check_on_policy(groups, step * cfg.train.updates_per_batch)
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
        mine = by_length(flat, shard_for_rank(P * G, dist.rank(), dist.world_size()))
        seqs = [flat[i] for i in mine]
        t = sequences_to_tensors(seqs, seq_adv.reshape(-1)[mine], self.source.pad_id)
        per_turn = cfg.advantage.credit != "episode"
        turn_level_em = cfg.advantage.entropy_modulation_level == "turn"
        if per_turn or turn_level_em:
            turn_index = turn_index_tensor(seqs, t["mask"].shape[1])
        if per_turn:
            turn_adv, turns = self._turn_advantages(flat, rewards, valid, lengths)  # [P * G, K]
            t["adv"] = turn_fn.turn_token_advantages(turn_adv[mine], turn_index)
            metrics["advantage/turn_abs_mean"] = (
                float(turn_adv[turns].abs().mean()) if turns.any() else 0.0
            )
        denom_local = losses.aggregation_denominator(t["mask"], cfg.loss.aggregation)
        denominator = max(dist.all_reduce_sum(denom_local), 1.0)
        token_total = max(dist.all_reduce_sum(float(t["mask"].sum())), 1.0)
        seq_total = max(dist.all_reduce_sum(float(t["mask"].any(-1).sum())), 1.0)
        t0 = time.perf_counter()
        if self.needs_old or cfg.kl.coef > 0:
            with phase_trace.span("logprob"):  # POSTTRAIN_PHASE_TRACE (opt-in)
                self._add_old_and_ref(t, model)
        if any(s.hint_prompt_ids is not None for s in flat):  # Guide (same on every rank)
            self._add_hinted_old(t, seqs, model)
        metrics["time/logprob_s"] = time.perf_counter() - t0
        if cfg.advantage.entropy_modulation and turn_level_em:
            t["adv"] = turn_fn.turn_entropy_modulation(
                t["adv"], t["entropy_old"], t["mask"], turn_index, cfg.advantage.entropy_modulation
            )
        elif cfg.advantage.entropy_modulation:
            t["adv"] = adv_fn.entropy_modulation(
                t["adv"], t["entropy_old"], t["mask"], cfg.advantage.entropy_modulation
            )
        size = cfg.train.micro_batch_size_per_device
        micro = split_micro_batches(t, size, cfg.train.max_tokens_per_micro_batch)
        metrics["advantage/abs_mean"] = float(seq_adv[valid].abs().mean()) if valid.any() else 0.0
        return StepBatch(
            micro,
            metrics,
            updates=cfg.train.updates_per_batch,
            denominator=denominator,
            token_total=token_total,
            seq_total=seq_total,
        )

    def _turn_advantages(
        self, flat: list[Sample], rewards: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-turn advantages [P * G, K] of the step's episodes (`advantage.credit`), and
        which of them are turns of valid episodes ([P * G, K] bool).

        `rewards` [P, G] are the float32 episode rewards the episode-level path uses, so with
        gamma = 1 and no turn rewards every turn gets exactly the episode's advantage.
        """
        a = self.cfg.advantage
        P, G = rewards.shape
        turn_rewards, progress, n_turns = turn_tensors(flat)
        returns = turn_fn.turn_returns(
            rewards.float().reshape(-1), turn_rewards, progress, n_turns, a.credit, a.turn_discount
        )
        adv = turn_fn.turn_advantages(
            returns.reshape(P, G, -1),
            n_turns.reshape(P, G),
            valid,
            a.estimator,
            eps=a.eps,
            lengths=lengths.float(),
        )
        turns = valid.reshape(-1, 1) & (torch.arange(adv.shape[-1]) < n_turns.unsqueeze(-1))
        return adv.reshape(P * G, -1), turns

    def _add_old_and_ref(self, t: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
        """Fill logp_old / entropy_old (current policy) where `needs_old`, and logp_ref, without
        grad. With one update per batch and no EMPG the policy pass is skipped: the loss's
        detached current log-probs are then exactly the step-start ones."""
        cfg = self.cfg
        size = cfg.train.micro_batch_size_per_device
        stats = policy_token_stats(
            model, t, cfg.rollout.temperature, size, self.ref_model, policy=self.needs_old
        )
        t.update(stats)

    def _add_hinted_old(
        self, t: dict[str, torch.Tensor], seqs: list[Sample], model: torch.nn.Module
    ) -> None:
        """Guide: `logp_old` of hinted rows = the step-start policy's log-probs of the sampled
        tokens in the HINTED context they were sampled in (`guidance.behaviour_logp_old`), so
        the surrogate's ratio is pi_theta(y | x) / pi_old(y | x, h); other rows keep theirs.

        One no-grad pass over this rank's rows, each in the context it was sampled in (equal
        row counts on every rank, so ZeRO-3's gathered forwards stay in step).
        """
        cfg = self.cfg
        ctx = [s.hint_prompt_ids or s.rollout.prompt_ids for s in seqs]
        ids = [c + s.rollout.completion_ids for c, s in zip(ctx, seqs, strict=True)]
        behaviour = {
            "input_ids": pad_right(ids, self.source.pad_id, torch.long),
            "attention_mask": pad_right([[1] * len(x) for x in ids], 0, torch.long),
        }
        size = cfg.train.micro_batch_size_per_device
        src = policy_token_stats(model, behaviour, cfg.rollout.temperature, size)["logp_old"]
        hinted_old = guidance.realign_completion_logps(
            src,
            torch.tensor([len(c) - 1 for c in ctx]),
            torch.tensor([len(s.rollout.prompt_ids) - 1 for s in seqs]),
            torch.tensor([len(s.rollout.completion_ids) for s in seqs]),
            t["mask"].shape[1],
        )
        hinted = torch.tensor([s.hint_prompt_ids is not None for s in seqs], dtype=torch.bool)
        # unhinted rows keep theirs; where nothing computed one (one update per batch) NaN marks
        # them, and the loss then uses the detached current log-probs there, as it would
        # without Guide (`clipped_policy_loss`)
        base = t.get("logp_old", torch.full_like(hinted_old, float("nan")))
        t["logp_old"] = guidance.behaviour_logp_old(base, hinted_old, hinted)

    # ---------------------------------------------------------------- loss
    def loss(
        self, outputs: Any, mb: dict[str, torch.Tensor], batch: StepBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step loss and metrics."""
        return clipped_policy_loss(
            self.cfg,
            outputs,
            mb,
            batch.denominator,
            batch.token_total,
            self.cfg.kl.coef,
            seq_total=batch.seq_total,
        )


def clipped_policy_loss(
    cfg: Config,
    outputs: Any,
    mb: dict[str, torch.Tensor],
    denominator: float,
    token_total: float,
    kl_coef: float,
    seq_total: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's share of the clipped policy loss (shared by GRPO and PPO).

    The clipped surrogate (token or sequence ratio), rollout correction (`loss.rollout_correction`:
    TIS by default), KL-in-loss and entropy terms, aggregated with whole-step denominators
    (`loss.*` options).

    Args:
        cfg: run config (`loss`, `kl.estimator`, `rollout.temperature`, `max_new_tokens`).
        outputs: the micro-batch's forward output: `lean` (hidden state + head, chunked
            log-probs, `train.logprob_chunk_tokens`) or `logits` [b, L, V].
        mb: `input_ids` [b, L]; `mask`, `adv`, `logp_roll` [b, L-1]; optional `logp_old` (else
            the detached current log-probs) and `logp_ref` (needed when kl_coef > 0).
        denominator: the step's global aggregation denominator.
        token_total: the step's global count of loss tokens (metric shares).
        kl_coef: weight of the KL-to-reference term in the loss (0 = off).
        seq_total: the step's global count of samples with loss tokens (masked-sample share).

    Returns:
        (loss share, metric shares).
    """
    lc = cfg.loss
    ent_mode = "grad" if lc.entropy_coef else "metric"  # metric: no graph through it
    logp, entropy = output_token_stats(
        outputs, mb["input_ids"], cfg.rollout.temperature, entropy=ent_mode
    )
    mask = mb["mask"]
    logp_old = logp.detach()
    if "logp_old" in mb:  # NaN: this row's old log-probs are the current ones (see Guide)
        logp_old = torch.where(torch.isnan(mb["logp_old"]), logp_old, mb["logp_old"])
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
    d, n_tok = denominator, token_total
    w, corr = off_policy.rollout_correction(
        logp_old,
        mb["logp_roll"],
        mask,
        lc.rollout_correction,
        threshold=lc.rollout_correction_threshold,
        tis_cap=lc.tis_cap,
    )
    shares = mismatch_shares(corr, n_tok, seq_total)
    if w is not None:
        loss_tok = loss_tok * w
    if lc.rollout_correction in off_policy.WITH_TIS and lc.tis_cap is not None:
        shares["tis/capped_frac"] = float(corr["capped_count"]) / n_tok
    if kl_coef > 0:
        kl = losses.kl_estimate(logp, mb["logp_ref"], cfg.kl.estimator)
        loss_tok = loss_tok + kl_coef * kl
        shares["kl"] = float((kl.detach() * mask).sum()) / n_tok
    assert entropy is not None
    if lc.entropy_coef:
        loss_tok = loss_tok - lc.entropy_coef * entropy
    shares["entropy"] = float((entropy.detach() * mask).sum()) / n_tok
    shares["clip_frac"] = float((stats["clipped"].float() * mask).sum()) / n_tok
    loss = losses.aggregate(loss_tok, mask, lc.aggregation, d, cfg.rollout.max_new_tokens)
    return loss, shares


__all__ = ["GRPO", "clipped_policy_loss", "pad_right"]


def build_grpo(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> GRPO:
    """GRPO over a rollout source, with a frozen reference when `kl.coef > 0`."""
    source = make_rollout_source(cfg, model_path, tokenizer)
    ref = frozen_reference(cfg, model_path) if cfg.kl.coef > 0 else None
    install_lean_forward(engine, cfg.train.logprob_chunk_tokens)
    install_lean_forward(ref, cfg.train.logprob_chunk_tokens)
    return GRPO(cfg, source, ref)
