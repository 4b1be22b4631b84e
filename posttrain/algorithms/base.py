"""The seam between the one training loop and the algorithms.

An algorithm makes a step's batch (generation, rewards, advantages, reference log-probs: whatever
it needs) and turns the model's outputs for one micro-batch into a loss. The trainer only runs
forward, backward and the optimizer; it never knows which algorithm it runs.

Convention: `loss()` returns this micro-batch's *share* of the step loss and of every metric,
already divided by global (whole-step, all-rank) denominators, so the trainer just sums shares
over micro-batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


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
        step_state: anything else the step's loss reads (e.g. PPO's `critic_only`).
    """

    micro_batches: list[dict[str, torch.Tensor]]
    metrics: dict[str, float] = field(default_factory=dict)
    updates: int = 1
    denominator: float = 1.0
    token_total: float = 1.0
    step_state: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Algorithm(Protocol):
    """What the trainer calls. Implementations live one per file in this folder.

    Attributes:
        rolls_out: `make_batch` samples from a rollout engine (the loop names the phase
            "generate" and the engine gets the weights in `after_step`).
        evaluates: `evaluate` reports held-out metrics (run before and after training when
            `eval.num_problems > 0`, and every `train.eval_every` steps).
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
    """The subset of a micro-batch that the model's forward takes."""
    return {k: micro_batch[k] for k in MODEL_INPUT_KEYS if k in micro_batch}


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
