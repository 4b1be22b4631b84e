"""PPO's trained module: the policy and its critic under one `nn.Module`.

The one trainer builds one DeepSpeed engine and one optimizer over `ActorCritic`; the policy and
the critic have disjoint parameters (two optimizer param groups, so the critic may get its own
learning rate), and gradient clipping (`optim.max_grad_norm`) applies to their *joint* norm.

`ppo.value_head`:
- `separate` (default): the critic is a scalar-head sequence classifier (`load_reward_model`)
  from the same init path as the policy (or `ppo.critic_path`, e.g. a trained reward model),
  read at every token instead of only the last one.
- `shared`: a linear value head on the policy's last hidden state (one backbone for both).

Weight sync and `save_pretrained` export only the policy (`export_module`, `export_state_dict`,
used by `posttrain.runtime.checkpoint`); the DeepSpeed engine state in every checkpoint holds
both, so a run resumes with its critic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.models.lean_logprobs import LeanHidden
from posttrain.models.loading import load_policy
from posttrain.models.reward_model import load_reward_model

POLICY_PREFIX = "policy."


@dataclass
class ActorCriticOutput:
    """What `ActorCritic.forward` returns.

    Attributes:
        logits: [B, L, V] policy logits; None while `critic_only` (the policy is not run) or
            when `lean` is set.
        values: [B, L] float32 critic values V(s_t): the value of the prefix ending at token t,
            i.e. of the state from which token t+1 is sampled.
        lean: the policy's last hidden state [B, L, H] and output embedding, instead of logits
            (`logprob_chunk_tokens > 0`; `lean_logprobs.output_token_stats` reads it).
    """

    logits: Tensor | None
    values: Tensor
    lean: LeanHidden | None = None


class ActorCritic(nn.Module):
    """A causal-LM policy plus a critic (separate scalar-head model or a shared value head).

    Args:
        policy: a transformers causal LM.
        critic: a transformers sequence classifier with one label (`separate`), or None.
        value_head: nn.Linear(hidden, 1) over the policy's last hidden state (`shared`), or None.
        critic_lr_multiplier: the critic param group's learning rate / the policy's.
    """

    def __init__(
        self,
        policy: Any,
        critic: Any | None = None,
        value_head: nn.Linear | None = None,
        critic_lr_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        if (critic is None) == (value_head is None):
            raise ValueError("ActorCritic needs exactly one of critic (separate) or value_head")
        self.policy = policy
        self.critic = critic
        self.value_head = value_head
        self.critic_lr_multiplier = float(critic_lr_multiplier)
        # Set by PPO during critic warm-up: the forward skips the policy's logits (and, with a
        # shared head, runs the backbone without grad), so only the critic can change.
        self.critic_only = False
        # > 0: the forward returns the policy's last hidden state + head (`lean`), not logits;
        # log-probs are then computed in chunks of this many tokens (train.logprob_chunk_tokens)
        self.logprob_chunk_tokens = 0

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> ActorCriticOutput:
        """Policy logits and per-token values.

        Args:
            input_ids: [B, L] token ids.
            attention_mask: [B, L] 1 on real tokens.
            position_ids: [B, L] optional positions.

        Returns:
            ActorCriticOutput with logits [B, L, V] (or None; `lean` instead when
            `logprob_chunk_tokens > 0`) and values [B, L] float32.
        """
        kw = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}
        chunk, head = self.logprob_chunk_tokens, self.policy.get_output_embeddings()
        logits, lean = None, None
        if self.critic is not None:
            if not self.critic_only and chunk > 0:
                h_pol = self.policy.base_model(input_ids, **kw).last_hidden_state
                lean = LeanHidden(h_pol, head, chunk)
            elif not self.critic_only:
                logits = self.policy(input_ids, **kw).logits
            hidden = self.critic.base_model(input_ids, **kw).last_hidden_state
            values = self.critic.score(hidden)
        else:
            assert self.value_head is not None
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.critic_only):
                hidden = self.policy.base_model(input_ids, **kw).last_hidden_state
            if not self.critic_only and chunk > 0:
                lean = LeanHidden(hidden, head, chunk)
            elif not self.critic_only:
                logits = head(hidden)
            values = self.value_head(hidden)
        return ActorCriticOutput(logits, values.squeeze(-1).float(), lean)

    def critic_parameters(self) -> list[nn.Parameter]:
        """The critic's own trainable parameters (the whole critic model, or the value head)."""
        part = self.critic if self.critic is not None else self.value_head
        return [p for p in part.parameters() if p.requires_grad]

    def optimizer_groups(self, lr: float) -> list[dict[str, Any]]:
        """Two disjoint AdamW param groups: policy at `lr`, critic at `lr * multiplier`."""
        critic_ids = {id(p) for p in self.critic_parameters()}
        policy = [p for p in self.parameters() if p.requires_grad and id(p) not in critic_ids]
        return [
            {"params": policy, "lr": lr},
            {"params": self.critic_parameters(), "lr": lr * self.critic_lr_multiplier},
        ]

    def export_module(self) -> Any:
        """The transformers model that checkpoints save (`save_pretrained`): the policy."""
        return self.policy

    def export_state_dict(self, full: dict[str, Tensor]) -> dict[str, Tensor]:
        """The policy's slice of this module's full state dict, under the policy's own names."""
        n = len(POLICY_PREFIX)
        return {k[n:]: v for k, v in full.items() if k.startswith(POLICY_PREFIX)}


def load_actor_critic(
    path: str,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    lora: Any = None,
    cfg: Any = None,
) -> ActorCritic:
    """Load the policy from `path` and build its critic as `cfg.ppo` says (PPO's model loader).

    A critic whose head is new (loaded from the policy's own init path, or the shared head)
    starts at zero, so the first values are 0 and the first advantages are reward-driven; a
    `ppo.critic_path` checkpoint keeps its head (e.g. a trained reward model's).

    Args:
        path: the policy's model directory or hub name (also the critic's, by default).
        dtype: "float32" | "bfloat16" | "float16".
        gradient_checkpointing: for the policy and the separate critic.
        lora: `model.lora`; must be off (r = 0) for PPO (config validation says so).
        cfg: the run Config (`ppo.value_head`, `critic_path`, `critic_lr_multiplier`); None =
            defaults.
    """
    from posttrain.config import PPOConfig

    p = cfg.ppo if cfg is not None else PPOConfig()
    policy = load_policy(
        path, dtype=dtype, gradient_checkpointing=gradient_checkpointing, lora=lora
    )
    if p.value_head == "separate":
        critic = load_reward_model(p.critic_path or path, dtype, gradient_checkpointing)
        if p.critic_path is None:
            with torch.no_grad():
                critic.score.weight.zero_()
        return ActorCritic(policy, critic=critic, critic_lr_multiplier=p.critic_lr_multiplier)
    hidden = policy.config.get_text_config().hidden_size
    head = nn.Linear(hidden, 1, bias=False, dtype=policy.dtype)
    nn.init.zeros_(head.weight)
    return ActorCritic(policy, value_head=head, critic_lr_multiplier=p.critic_lr_multiplier)
