"""PPO with a critic (`train.algorithm: ppo`, `advantage.estimator: gae`).

make_batch: prompts -> rollout engine -> rewards (any `rewards:` function, including a trained
`reward_model`) -> one no-grad pass of the `ActorCritic` (logp_old, V_old; logp_ref) -> token
rewards (R on the last token, minus beta * KL per token with `kl.in_reward`) -> GAE advantages
and returns -> advantages whitened over the step's masked tokens (all ranks).
loss: the GRPO family's clipped policy loss (`grpo.clipped_policy_loss`: clip, TIS, entropy
bonus, global-denominator aggregation) + vf_coef * the clipped value loss (token mean). During
`ppo.critic_warmup_steps` only the value loss trains. The adaptive KL controller's beta is part
of the resumable state. Math: docs/algorithms.md (`gae`, KL in reward, value loss).
Multi-turn episodes (`env.name`, an `EpisodeSource` from `make_rollout_source`) train the same
way: their mask is 0 on observation tokens, so GAE links each sampled token to the next sampled
token's value and the value, policy and KL terms see sampled tokens only.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from posttrain import advantages as adv_fn
from posttrain import losses
from posttrain.algorithms.base import StepBatch, split_micro_batches
from posttrain.algorithms.grpo import clipped_policy_loss
from posttrain.algorithms.online import OnlineAlgorithm, frozen_reference, sequences_to_tensors
from posttrain.config import Config
from posttrain.data.tensors import chunk_indices, shard_for_rank
from posttrain.errors import ConfigError
from posttrain.models.actor_critic import ActorCritic
from posttrain.models.lean_logprobs import install_lean_forward, lean_forward, output_token_stats
from posttrain.rollout.factory import make_rollout_source
from posttrain.rollout.source import SampleSource
from posttrain.runtime import distributed as dist
from posttrain.runtime import phase_trace


def global_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """Count, mean and sample variance (n - 1) of `x` over masked entries of every rank.

    Args:
        x: [B, T] values.
        mask: [B, T] bool/0-1.

    Returns:
        (n, mean, var) as floats (var 0 with fewer than 2 entries), computed in float64.
    """
    m = mask.bool()
    xs = x.double()[m]
    n = dist.all_reduce_sum(float(m.sum()))
    mean = dist.all_reduce_sum(float(xs.sum())) / max(n, 1.0)
    sq = dist.all_reduce_sum(float(((xs - mean) ** 2).sum()))
    return n, mean, sq / (n - 1) if n >= 2 else 0.0


def whiten_global(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`advantages.whiten` over the masked tokens of the whole step (all ranks).

    Args:
        x: [B, T] this rank's values (e.g. GAE advantages).
        mask: [B, T] bool/0-1.
        eps: added to the variance.

    Returns:
        [B, T] float32 (x - mean) / sqrt(var + eps), 0 where mask is 0.
    """
    if dist.world_size() == 1:
        return adv_fn.whiten(x, mask, eps=eps)
    _, mean, var = global_moments(x, mask)
    out = (x.float() - mean) / math.sqrt(var + eps)
    return torch.where(mask.bool(), out, torch.zeros_like(out))


@torch.no_grad()
def actor_critic_token_stats(
    model: Any, t: dict[str, torch.Tensor], temperature: float, micro_size: int, ref: Any
) -> dict[str, torch.Tensor]:
    """logp_old, entropy_old, values_old (and logp_ref) of the step's sequences, without grad.

    Args:
        model: the ActorCritic (or its DeepSpeed engine) as it is now.
        t: `input_ids`, `attention_mask` [N, L].
        temperature: the sampler's temperature.
        micro_size: rows per forward pass.
        ref: frozen reference causal LM, or None.

    Returns:
        [N, L-1] float32 tensors on the CPU, aligned with the targets `input_ids[:, 1:]`
        (`values_old[:, j]` is V of the prefix that samples token j+1).
    """
    device = dist.device()
    cols: dict[str, list[torch.Tensor]] = {"logp_old": [], "entropy_old": [], "values_old": []}
    if ref is not None:
        cols["logp_ref"] = []
    for idx in chunk_indices(t["input_ids"].shape[0], micro_size):
        ids, att = t["input_ids"][idx].to(device), t["attention_mask"][idx].to(device)
        out = model(input_ids=ids, attention_mask=att)
        logp, entropy = output_token_stats(out, ids, temperature, entropy="metric")
        cols["logp_old"].append(logp.cpu())
        cols["entropy_old"].append(entropy.cpu())
        cols["values_old"].append(out.values[:, :-1].float().cpu())
        if ref is not None:
            with lean_forward(ref):
                ref_out = ref(input_ids=ids, attention_mask=att)
            cols["logp_ref"].append(output_token_stats(ref_out, ids, temperature)[0].cpu())
    return {k: torch.cat(v) for k, v in cols.items()}


class PPO(OnlineAlgorithm):
    """PPO with GAE and a critic, driven by the one trainer.

    Args:
        cfg: run config (`ppo`, `kl`, `loss`, `rollout`).
        source: prompts + rollout engine + rewards (shared with evaluation).
        ref_model: frozen reference for the KL term, or None when `kl.coef == 0`.
    """

    def __init__(self, cfg: Config, source: SampleSource, ref_model: Any | None) -> None:
        super().__init__(cfg, source, ref_model)
        self.beta = float(cfg.kl.coef)
        self.controller = None
        if cfg.kl.target is not None:
            self.controller = losses.AdaptiveKLController(
                cfg.kl.coef, cfg.kl.target, cfg.kl.horizon
            )

    # --------------------------------------------------------------- batch
    def make_batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        """Generate, score, run the critic, compute GAE; this rank's micro-batches."""
        cfg = self.cfg
        module = _actor_critic(model)
        module.critic_only = False
        groups, metrics = self.source.collect_groups(step, model)
        flat = [s for g in groups for s in g]
        seqs = [flat[i] for i in shard_for_rank(len(flat), dist.rank(), dist.world_size())]
        t = sequences_to_tensors(seqs, torch.zeros(len(seqs)), self.source.pad_id)
        rewards = torch.tensor([s.reward if s.valid else 0.0 for s in seqs], dtype=torch.float)
        t0 = time.perf_counter()
        size = cfg.train.micro_batch_size_per_device
        with phase_trace.span("logprob"):  # POSTTRAIN_PHASE_TRACE (opt-in)
            t.update(
                actor_critic_token_stats(model, t, cfg.rollout.temperature, size, self.ref_model)
            )
        metrics["time/logprob_s"] = time.perf_counter() - t0
        metrics.update(self._advantages(t, rewards, len(flat)))
        denom_local = losses.aggregation_denominator(t["mask"], cfg.loss.aggregation)
        critic_only = step < cfg.ppo.critic_warmup_steps
        module.critic_only = critic_only
        metrics["ppo/critic_only"] = float(critic_only)
        micro = split_micro_batches(t, size, cfg.train.max_tokens_per_micro_batch)
        return StepBatch(
            micro,
            metrics,
            cfg.train.updates_per_batch,
            denominator=max(dist.all_reduce_sum(denom_local), 1.0),
            token_total=max(dist.all_reduce_sum(float(t["mask"].sum())), 1.0),
            seq_total=max(dist.all_reduce_sum(float(t["mask"].any(-1).sum())), 1.0),
            step_state={"critic_only": critic_only},
        )

    def _advantages(
        self, t: dict[str, torch.Tensor], rewards: torch.Tensor, n_samples: int
    ) -> dict[str, float]:
        """Fill t["adv"] and t["returns"] [N, L-1]; update the KL controller; return metrics."""
        cfg, p = self.cfg, self.cfg.ppo
        mask = t["mask"]
        metrics: dict[str, float] = {"kl/beta": self.beta}
        kl = torch.zeros_like(mask)
        if "logp_ref" in t:
            kl = losses.kl_estimate(t["logp_old"], t["logp_ref"], cfg.kl.estimator) * mask
        beta = self.beta if cfg.kl.in_reward else 0.0
        token_rewards = adv_fn.kl_shaped_rewards(rewards, kl, mask, beta)
        if "logp_ref" in t:
            kl_sum = dist.all_reduce_sum(float(kl.sum()))
            kl_seq = kl_sum / max(dist.all_reduce_sum(float(mask.any(-1).sum())), 1.0)
            metrics["kl/ref_per_sample"] = kl_seq
            if cfg.kl.in_reward:  # in the loss, "kl" is logged by clipped_policy_loss
                metrics["kl"] = kl_sum / max(dist.all_reduce_sum(float(mask.sum())), 1.0)
            if self.controller is not None:  # beta for the next step
                self.beta = self.controller.update(kl_seq, n_samples)
        adv, returns = adv_fn.gae(token_rewards, t["values_old"], mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = whiten_global(adv, mask)
        if cfg.advantage.entropy_modulation:
            adv = adv_fn.entropy_modulation(
                adv, t["entropy_old"], mask, cfg.advantage.entropy_modulation
            )
        t["adv"], t["returns"] = adv, returns
        _, v_mean, _ = global_moments(t["values_old"], mask)
        _, ret_mean, ret_var = global_moments(returns, mask)
        _, _, err_var = global_moments(returns - t["values_old"], mask)
        metrics["value/mean"] = v_mean
        metrics["value/returns_mean"] = ret_mean
        metrics["value/explained_var"] = 1.0 - err_var / ret_var if ret_var > 0 else 0.0
        return metrics

    # ---------------------------------------------------------------- loss
    def loss(
        self, outputs: Any, mb: dict[str, torch.Tensor], batch: StepBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Share of policy loss + vf_coef * value loss (value loss only during warm-up)."""
        cfg, p = self.cfg, self.cfg.ppo
        mask = mb["mask"]
        values = outputs.values[:, :-1]
        v_tok, v_stats = losses.value_loss(
            values, mb["values_old"], mb["returns"], mask, p.value_clip
        )
        v_loss = losses.aggregate(v_tok, mask, "token_mean", batch.token_total)
        shares = {
            "value/loss": float(v_loss.detach()),
            "value/clip_frac": float(v_stats["clipped"].sum()) / batch.token_total,
        }
        if batch.step_state["critic_only"]:
            return p.vf_coef * v_loss, shares
        kl_coef = 0.0 if cfg.kl.in_reward else cfg.kl.coef
        pg_loss, pg_shares = clipped_policy_loss(
            cfg, outputs, mb, batch.denominator, batch.token_total, kl_coef, batch.seq_total
        )
        shares.update(pg_shares)
        shares["policy/loss"] = float(pg_loss.detach())
        return pg_loss + p.vf_coef * v_loss, shares

    # ---------------------------------------------------------- lifecycle
    def state_dict(self) -> dict[str, Any]:
        """Data position, weight version and the KL coefficient (adaptive controller state)."""
        return {**super().state_dict(), "kl_beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        super().load_state_dict(state)
        self.beta = float(state["kl_beta"])
        if self.controller is not None:
            self.controller.beta = self.beta


def _actor_critic(model: Any) -> ActorCritic:
    """The ActorCritic inside a DeepSpeed engine (or the module itself)."""
    module = getattr(model, "module", model)
    if not isinstance(module, ActorCritic):
        raise ConfigError(
            f"train.algorithm=ppo trains an ActorCritic, but the trainer built "
            f"{type(module).__name__}; the trainer must load its model with "
            "ALGORITHMS['ppo'].load_model (posttrain/algorithms/__init__.py)"
        )
    return module


def build_ppo(cfg: Config, model_path: str, tokenizer: Any, engine: Any) -> PPO:
    """PPO over a rollout source, with a frozen reference when `kl.coef > 0`."""
    _actor_critic(engine)
    source = make_rollout_source(cfg, model_path, tokenizer)
    ref = frozen_reference(cfg, model_path) if cfg.kl.coef > 0 else None
    install_lean_forward(engine, cfg.train.logprob_chunk_tokens)
    install_lean_forward(ref, cfg.train.logprob_chunk_tokens)
    return PPO(cfg, source, ref)
