"""Lean token log-probs and entropies: from the last hidden state, in chunks of tokens.

The full path materialises [tokens, V] float32 logits, their log-softmax and the entropy terms
for a whole micro-batch (49k columns for SmolLM2, 151k for Qwen) and keeps them for backward.
Here the output embedding (lm head) is applied to `chunk_tokens` hidden rows at a time:

    z_c = head(h_c).float() / temperature                       # [C, V], one chunk only
    logp_c = z_c[y_c] - logsumexp(z_c)                          # [C]
    H_c = -sum_v softmax(z_c) * log_softmax(z_c)                # [C] (when asked for)

With grad each chunk runs under `torch.utils.checkpoint` (non-reentrant): only the chunk's
hidden rows and targets are saved, and backward recomputes z_c, so no [C, V] tensor outlives its
chunk. The price is one extra head matmul per chunk in backward.

ZeRO-3 invariant: the head is always *called as a module* (`head(h)`), never read through
`.weight`, so DeepSpeed's parameter gather hooks run on every chunk (also in the recompute) and
a LoRA-wrapped head applies its adapter.

How the hidden state reaches an algorithm's loss (the trainer only calls `engine(**inputs)`):
`install_lean_forward(model, chunk_tokens)` adds three hooks to the trained causal LM (or its
peft wrapper). While grad is enabled (the train forward) or inside `lean_forward(model)`, the
forward gets `logits_to_keep=1` (HF computes one position's logits instead of all), the backbone's
`last_hidden_state` is captured, and the output gets a `lean` attribute (`LeanHidden`). The PPO
`ActorCritic` does the same from its own forward (`logprob_chunk_tokens`). A loss then calls
`output_token_stats(outputs, input_ids, ...)`, which uses `outputs.lean` when present and the
full `outputs.logits` otherwise (models without a separable head, outputs built by hand).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from posttrain import losses

ENTROPY_MODES = ("none", "metric", "grad")
# config attributes of models whose logits are not lm_head(hidden) (soft-capping, scaling):
# those keep the full path
LOGIT_TRANSFORM_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_HOOK_ATTR = "_posttrain_lean_state"


@dataclass
class LeanHidden:
    """What a lean forward hands to the loss instead of full logits.

    Attributes:
        hidden: [B, L, H] the backbone's last hidden state (after the final norm).
        head: the output embedding module (hidden -> vocabulary logits); called per chunk.
        chunk_tokens: tokens per chunk (> 0).
    """

    hidden: Tensor
    head: Callable[[Tensor], Tensor]
    chunk_tokens: int


# --------------------------------------------------------------------------- pure math


def _logit_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (exactness tests); every other dtype is taken in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_stats(
    h: Tensor, y: Tensor, head: Callable[[Tensor], Tensor], temperature: float, entropy: str
) -> tuple[Tensor, Tensor | None]:
    """Log-probs [C] and (per `entropy`) entropies [C] of one chunk of hidden rows h [C, H]."""
    z = head(h)
    z = z.to(_logit_dtype(z.dtype))
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    picked = torch.gather(z, -1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(y >= 0, picked - lse, torch.zeros((), dtype=z.dtype, device=z.device))
    if entropy == "none":
        return logp, None
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy == "grad"):
        zz = z if entropy == "grad" else z.detach()
        logp_all = zz - (lse if entropy == "grad" else lse.detach()).unsqueeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def chunked_token_stats(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    targets: Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 256,
    entropy: str = "none",
) -> tuple[Tensor, Tensor | None]:
    """Token log-probs (and entropies) of softmax(head(hidden) / temperature), chunk by chunk.

    Equal to `losses.token_logprobs` / `losses.token_entropy` on the full logits
    `head(hidden)`, in value and gradient (w.r.t. hidden and the head's parameters).

    Args:
        hidden: [N, H] hidden rows (any float dtype; the logits are taken in float32, or float64
            for float64 inputs).
        head: hidden [C, H] -> logits [C, V]; a module (called, never read through `.weight`).
        targets: [N] token ids; negative ids give log-prob 0.
        temperature: > 0; logits are divided by it.
        chunk_tokens: rows per chunk (> 0); the last chunk may be shorter.
        entropy: "none" (not computed), "metric" (detached, no graph) or "grad" (differentiable).

    Returns:
        (log-probs [N], entropies [N] or None).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    if entropy not in ENTROPY_MODES:
        raise ValueError(f"entropy must be one of {ENTROPY_MODES}, got {entropy!r}")
    grad = torch.is_grad_enabled() and (
        hidden.requires_grad
        or any(p.requires_grad for p in getattr(head, "parameters", lambda: [])())
    )
    logps, ents = [], []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if grad:
            lp, ent = _checkpointed_chunk(h, y, head, temperature, entropy)
        else:
            lp, ent = _chunk_stats(h, y, head, temperature, entropy)
        logps.append(lp)
        ents.append(ent)
    if not logps:  # no tokens
        empty = hidden.new_zeros(0, dtype=_logit_dtype(hidden.dtype))
        return empty, None if entropy == "none" else empty
    return torch.cat(logps), None if entropy == "none" else torch.cat(ents)


def _checkpointed_chunk(
    h: Tensor, y: Tensor, head: Callable[[Tensor], Tensor], temperature: float, entropy: str
) -> tuple[Tensor, Tensor | None]:
    """One chunk under non-reentrant checkpoint. A metric entropy is computed on the first run
    only: the recompute in backward just rebuilds the log-prob graph."""
    if entropy == "grad":
        return checkpoint(_chunk_stats, h, y, head, temperature, "grad", use_reentrant=False)
    metric: list[Tensor] = []

    def run(h_: Tensor) -> Tensor:
        lp, ent = _chunk_stats(h_, y, head, temperature, "none" if metric else entropy)
        if ent is not None:
            metric.append(ent)
        return lp

    lp = checkpoint(run, h, use_reentrant=False)
    return lp, metric[0] if metric else None


def full_token_stats(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, entropy: str = "none"
) -> tuple[Tensor, Tensor | None]:
    """The full path (`losses.token_logprobs` / `token_entropy`) with the same interface.

    Args:
        logits: [B, T, V].
        targets: [B, T].
        temperature: > 0.
        entropy: "none" | "metric" | "grad".

    Returns:
        (log-probs [B, T], entropies [B, T] or None).
    """
    logp = losses.token_logprobs(logits, targets, temperature)
    if entropy == "none":
        return logp, None
    if entropy == "grad":
        return logp, losses.token_entropy(logits, temperature)
    with torch.no_grad():
        return logp, losses.token_entropy(logits.detach(), temperature)


def output_token_stats(
    outputs: Any, input_ids: Tensor, temperature: float = 1.0, entropy: str = "none"
) -> tuple[Tensor, Tensor | None]:
    """Next-token log-probs (and entropies) of a forward output, lean when it can be.

    Args:
        outputs: a model output with `lean` (`LeanHidden`, from a lean forward) or `logits`
            [B, L, V].
        input_ids: [B, L] the forward's input ids (targets are `input_ids[:, 1:]`).
        temperature: > 0.
        entropy: "none" | "metric" | "grad".

    Returns:
        (log-probs [B, L-1] float32, entropies [B, L-1] or None), aligned with the targets.
    """
    lean = getattr(outputs, "lean", None)
    if lean is None:
        logits = outputs.logits
        return full_token_stats(
            logits[:, :-1], input_ids[:, 1:].to(logits.device), temperature, entropy
        )
    h = lean.hidden[:, :-1]
    B, T, H = h.shape
    y = input_ids[:, 1:].to(h.device).reshape(-1)
    lp, ent = chunked_token_stats(
        h.reshape(B * T, H), lean.head, y, temperature, lean.chunk_tokens, entropy
    )
    return lp.view(B, T), None if ent is None else ent.view(B, T)


# --------------------------------------------------------------------------- model hooks


@dataclass
class _LeanState:
    """Per-model hook state: the chunk size, whether a forward is lean, what it captured."""

    chunk_tokens: int
    head: Any
    forced: int = 0
    active: bool = False
    hidden: Tensor | None = None


def causal_lm_of(model: Any) -> Any:
    """The transformers causal LM inside a DeepSpeed engine / DDP (`.module`) and peft wrapper."""
    root = getattr(model, "module", model)
    if hasattr(root, "peft_config") and hasattr(root, "get_base_model"):
        return root.get_base_model()
    return root


def separable_head(lm: Any) -> tuple[Any, Any] | None:
    """(backbone, head) of a causal LM whose logits are head(backbone(...).last_hidden_state)
    and whose forward takes `logits_to_keep`; None otherwise (the full path stays)."""
    import inspect

    if not all(hasattr(lm, a) for a in ("get_output_embeddings", "base_model", "forward")):
        return None
    head, backbone = lm.get_output_embeddings(), lm.base_model
    if head is None or backbone is lm or not isinstance(backbone, nn.Module):
        return None
    cfg = getattr(lm, "config", None)
    if cfg is not None and any(getattr(cfg, a, None) for a in LOGIT_TRANSFORM_ATTRS):
        return None
    try:
        params = inspect.signature(lm.forward).parameters
    except (TypeError, ValueError):
        return None
    return (backbone, head) if "logits_to_keep" in params else None


def install_lean_forward(model: Any, chunk_tokens: int) -> bool:
    """Make `model`'s grad-enabled forwards lean (see the module docstring); idempotent.

    Args:
        model: DeepSpeed engine, peft model, causal LM or `ActorCritic` (or None).
        chunk_tokens: `train.logprob_chunk_tokens`; 0 leaves the model (and any earlier
            install) on the full path.

    Returns:
        True when the model's forwards are now lean.
    """
    if model is None:
        return False
    root = getattr(model, "module", model)
    if hasattr(root, "logprob_chunk_tokens"):  # ActorCritic: its own forward does it
        lean = chunk_tokens > 0 and separable_head(root.policy) is not None
        root.logprob_chunk_tokens = int(chunk_tokens) if lean else 0
        return lean
    state = getattr(root, _HOOK_ATTR, None)
    if state is not None:
        state.chunk_tokens = int(chunk_tokens)
        return chunk_tokens > 0
    found = separable_head(causal_lm_of(root))
    if chunk_tokens <= 0 or found is None:
        return False
    backbone, head = found
    state = _LeanState(int(chunk_tokens), head)
    setattr(root, _HOOK_ATTR, state)
    root.register_forward_pre_hook(_pre_hook(state), with_kwargs=True)
    backbone.register_forward_hook(_capture_hook(state))
    root.register_forward_hook(_attach_hook(state))
    return True


def _pre_hook(state: _LeanState) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state.active = state.chunk_tokens > 0 and (torch.is_grad_enabled() or state.forced > 0)
        if state.active:
            kwargs = {**kwargs, "logits_to_keep": 1}
        return args, kwargs

    return hook


def _capture_hook(state: _LeanState) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if state.active:
            state.hidden = (
                output.last_hidden_state if hasattr(output, "last_hidden_state") else (output[0])
            )

    return hook


def _attach_hook(state: _LeanState) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if state.active and state.hidden is not None:
            output.lean = LeanHidden(state.hidden, state.head, state.chunk_tokens)
        state.active, state.hidden = False, None
        return output

    return hook


@contextlib.contextmanager
def lean_forward(model: Any) -> Iterator[None]:
    """Make `model`'s forwards lean also without grad (no-op for models without the hooks)."""
    state = getattr(getattr(model, "module", model), _HOOK_ATTR, None)
    if state is None:
        yield
        return
    state.forced += 1
    try:
        yield
    finally:
        state.forced -= 1
