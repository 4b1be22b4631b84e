"""The seam between the one training loop and the algorithms.

An algorithm makes a step's batch (generation, rewards, advantages, reference log-probs: whatever
it needs) and turns the model's outputs for one micro-batch into a loss. The trainer only runs
forward, backward and the optimizer; it never knows which algorithm it runs.

Convention: `loss()` returns this micro-batch's *share* of the step loss and of every metric,
already divided by global (whole-step, all-rank) denominators, so the trainer just sums shares
over micro-batches and ranks. A metric whose name ends in `MAX_SUFFIX` (`_max`) is a maximum
instead: the trainer keeps the largest value over micro-batches, updates and ranks
(`add_shares`, `reduce_shares`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from posttrain.data.tensors import chunk_indices, token_budget_groups
from posttrain.models.vlm import image_model_inputs
from posttrain.runtime import distributed as dist

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")
# marks a zero-weight micro-batch that only keeps a rank's backward count equal to the others'
PADDING_KEY = "padding_micro_batch"
# metric shares named `..._max` are maxima over micro-batches, updates and ranks, not sums
MAX_SUFFIX = "_max"


@dataclass
class StepBatch:
    """One optimizer step's data on this rank, and the step's global denominators.

    Attributes:
        micro_batches: dicts of tensors; `input_ids`/`attention_mask` [b, L] go to the model,
            the rest is for `Algorithm.loss`.
        metrics: step metrics computed while making the batch (already global).
        updates: optimizer steps taken over these micro-batches (logp_old fixed for all).
        denominator: the step's global (all-rank) loss denominator: loss tokens, sequences or
            pairs, as the algorithm aggregates. `loss` divides by it.
        token_total: the step's global count of loss tokens (per-token metric shares).
        seq_total: the step's global count of samples with at least one loss token
            (per-sample metric shares).
        step_state: anything else the step's loss reads (e.g. PPO's `critic_only`).
    """

    micro_batches: list[dict[str, torch.Tensor]]
    metrics: dict[str, float] = field(default_factory=dict)
    updates: int = 1
    denominator: float = 1.0
    token_total: float = 1.0
    seq_total: float = 1.0
    step_state: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Algorithm(Protocol):
    """What the trainer calls. Implementations live one per file in this folder.

    Attributes:
        rolls_out: `make_batch` samples from a rollout engine (the loop names the phase
            "generate" and the engine gets the weights in `after_step`).
        evaluates: `evaluate` reports held-out metrics (run before and after training when
            `eval.num_problems > 0`, and every `train.eval_every` steps).

    An algorithm that samples single-turn answers may also have `pass_counts(n)` ([S][P] correct
    samples among n per held-out problem and seed, or None): the trainer then draws the
    before/after pass@k curve of its final report (`eval.run_pass_k_max`; `OnlineAlgorithm`).
    """

    rolls_out: bool
    evaluates: bool

    def make_batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        """Build step `step`'s micro-batches (may run the model without grad)."""
        ...

    def loss(
        self, outputs: Any, micro_batch: dict[str, torch.Tensor], batch: StepBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (loss share, metric shares) for one micro-batch of `batch`."""
        ...

    def after_step(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Called after the optimizer steps of a batch (e.g. weight sync); returns metrics."""
        ...

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics with the current weights ({} when `evaluates` is False)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (data position, weight version, controllers)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        ...


def model_inputs(micro_batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The subset of a micro-batch that the model's forward takes (a VLM's rows: also their
    image tensors, `models.vlm.image_model_inputs`)."""
    out = {k: micro_batch[k] for k in MODEL_INPUT_KEYS if k in micro_batch}
    out.update(image_model_inputs(micro_batch))
    return out


def trim_micro_batch(mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut a micro-batch's right padding to its own longest sequence.

    `input_ids`/`attention_mask` [b, L] are cut to [b, W] (W = longest row), every other 2-D
    tensor (per next-token target, [b, L-1]) to [b, W-1]; 1-D tensors [b] are kept.
    """
    width = int(mb["attention_mask"].sum(dim=1).max())
    out = {}
    for k, v in mb.items():
        if v.dim() == 2:
            out[k] = v[:, :width] if k in ("input_ids", "attention_mask") else v[:, : width - 1]
        else:
            out[k] = v
    return out


def split_micro_batches(
    t: dict[str, torch.Tensor], micro_batch_size: int, max_tokens: int | None
) -> list[dict[str, torch.Tensor]]:
    """A rank's step tensors as trimmed micro-batches: fixed row counts or a token budget.

    Fixed (`max_tokens` None): consecutive chunks of `micro_batch_size` rows. Budget: rows
    grouped by `data.tensors.token_budget_groups` so rows x longest row <= `max_tokens` (a longer
    row alone); every rank then runs the largest count of any rank, the others padded with
    zero-weight micro-batches (`empty_micro_batch`), because each backward is a gradient
    reduction in DeepSpeed (gradient_accumulation_steps is 1) that every rank must join.
    The loss denominators are global, so neither the grouping nor the row order changes the
    step's gradient.

    Args:
        t: `input_ids`, `attention_mask` [N, L], per-target tensors [N, L-1], per-row [N].
        micro_batch_size: rows per micro-batch without a budget.
        max_tokens: `train.max_tokens_per_micro_batch`, or None.

    Returns:
        The micro-batches, each cut to its own longest row (`trim_micro_batch`).
    """
    n = t["input_ids"].shape[0]
    if max_tokens is None:
        groups = chunk_indices(n, micro_batch_size)
    else:
        groups = token_budget_groups(t["attention_mask"].sum(dim=1).tolist(), max_tokens)
    micro = [trim_micro_batch({k: v[idx] for k, v in t.items()}) for idx in groups]
    if max_tokens is not None:
        n_micro = max_over_ranks(len(micro))
        micro += [empty_micro_batch(micro[0]) for _ in range(n_micro - len(micro))]
    return micro


def empty_micro_batch(mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A zero-weight micro-batch shaped like `mb`: its first row cut to (at most) two tokens,
    attended, with every non-model tensor zero (so `mask` 0: no loss, no metric, zero gradient),
    marked by `PADDING_KEY` ([1] ones; the trainer counts these).

    Args:
        mb: a trimmed micro-batch (`input_ids`/`attention_mask` [b, W], per-target [b, W-1]).

    Returns:
        `input_ids`/`attention_mask` [1, w] (w = min(2, W)), per-target [1, w-1], per-row [1].
    """
    width = min(2, mb["input_ids"].shape[1])
    out = {}
    for k, v in mb.items():
        if k == "attention_mask":
            out[k] = torch.ones_like(v[:1, :width])
        elif k in MODEL_INPUT_KEYS:
            out[k] = v[:1, :width].clone()
        else:
            out[k] = torch.zeros_like(v[:1, : width - 1] if v.dim() == 2 else v[:1])
    out[PADDING_KEY] = torch.ones(1)
    return out


def pad_counts(micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """(padded slots, total slots) of micro-batches with a 2-D `attention_mask` [b, W].

    A micro-batch of b rows padded to W holds b x W slots, of which those with attention 0
    are padding, and all of a zero-weight one (`PADDING_KEY`); packed micro-batches (a 4-D
    block mask) have no padding rows and are skipped.
    """
    padded = slots = 0.0
    for mb in micro_batches:
        att = mb.get("attention_mask")
        if att is not None and att.dim() == 2:
            slots += float(att.numel())
            padded += float(att.numel() if PADDING_KEY in mb else att.numel() - att.sum())
    return padded, slots


def max_over_ranks(n: int) -> int:
    """The largest `n` over all ranks (`n` itself on one process)."""
    if not torch.distributed.is_initialized() or dist.world_size() == 1:
        return n
    x = torch.tensor([n], dtype=torch.long, device=dist.device())
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return int(x.item())


def add_shares(totals: dict[str, float], shares: dict[str, float]) -> None:
    """Accumulate one micro-batch's metric shares into `totals` (in place): a sum, or the
    largest value for names ending in `MAX_SUFFIX`."""
    for k, v in shares.items():
        if k not in totals:
            totals[k] = float(v)
        elif k.endswith(MAX_SUFFIX):
            totals[k] = max(totals[k], float(v))
        else:
            totals[k] += float(v)


def reduce_shares(totals: dict[str, float], updates: int) -> dict[str, float]:
    """The step's metrics from this rank's `totals` over `updates` passes of the batch: sums over
    ranks divided by `updates`, or the largest value over ranks for `MAX_SUFFIX` names."""
    return {
        k: dist.all_reduce_max(v) if k.endswith(MAX_SUFFIX) else dist.all_reduce_sum(v) / updates
        for k, v in totals.items()
    }
