"""Non-finite steps: a NaN or inf loss or gradient skips the optimizer update; too many in a
row stop the run.

Detection, for every optimizer update, after its backward passes and before `engine.step()`:

- loss: each micro-batch's loss share is read as a float anyway (metric shares); a NaN or inf
  one marks the update;
- gradient: a hook on every trainable parameter checks each gradient as autograd produces it,
  before DeepSpeed reduces, partitions or accumulates it (one `isfinite` pass on the device, no
  host sync). This is the same for ZeRO 0-3, LoRA and gradient checkpointing; a NaN on any rank
  would reach every rank's reduced gradient.

The ranks agree with one all-reduce (MAX), so all of them skip or none does.

Skipping an update still calls `engine.step()`, with the torch optimizer's own `step` replaced by
a no-op and the LR scheduler detached for that one call (`update_suppressed`). Why not skip
`engine.step()` and zero the gradients: in DeepSpeed 0.19 with unmanaged accumulation,
`engine.step()` is the accumulation boundary where ZeRO-2/3 flush their pending gradient buckets
and ZeRO-0/1 reduce across ranks, and the step then clears gradients *and* the partitioned
accumulators. `engine.zero_grad()` and `optimizer.zero_grad()` clear only `param.grad` (ZeRO-2
keeps its reduced partitions, `averaged_gradients`, and the pending bucket contents; ZeRO-3 its
partitioned gradients), and there is no public call that discards those. So the step runs
DeepSpeed's own cleanup and nothing else changes: weights, AdamW moments and step counts and the
LR schedule stay bitwise as they were, as if the batch had not been drawn (the data position
still moves on). ZeRO 1-3 also
skip an update themselves when the reduced gradient norm is not finite
(`engine.was_step_applied()` is then False); the trainer counts that as a skipped update too,
except with float16, where only the loss is checked: there an overflow of the loss-scaled
gradients is the dynamic loss scaler at work.

A step with a skipped update is a bad step: its remaining updates (`train.updates_per_batch`)
are skipped too, it is logged (`train/skipped` 1, `train/skipped_steps`, a line on stderr and a
row in `<output_dir>/bad_steps.jsonl` with the step's data position) and the run goes on. More
than `train.max_bad_steps` bad steps in a row stop the run (`NumericalError`, exit status 1)
with the checkpoint from before the first of them: the skipped steps changed no weight, so the
engine still holds that state, saved with the trainer state and RNG noted when that step began.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.runtime import distributed as dist
from posttrain.runtime.checkpoint import Snapshot

LIMIT_KEY = "train.max_bad_steps"
LOG_FILE = "bad_steps.jsonl"


class GradientCheck:
    """Notes non-finite losses and gradients of one optimizer update on this rank.

    Args:
        module: the trained module (`engine.module`); its trainable parameters get a hook.
        grads: check the gradients. False with float16: the gradients are loss-scaled, and an
            inf among them is the dynamic loss scaler's routine overflow (DeepSpeed skips
            that update and lowers the scale), not a fault.
    """

    def __init__(self, module: torch.nn.Module, grads: bool = True) -> None:
        self._finite: torch.Tensor | None = None  # 0-dim bool on the gradients' device
        self.bad_losses = 0
        params = [p for p in module.parameters() if p.requires_grad] if grads else []
        self._handles = [p.register_hook(self._see_grad) for p in params]

    def _see_grad(self, grad: torch.Tensor) -> None:
        # the sum is NaN or inf when any entry is (no gradient-sized bool temporary)
        ok = torch.isfinite(grad.sum(dtype=torch.float32))
        if self._finite is None:
            self._finite = ok
        else:
            self._finite = self._finite & ok.to(self._finite.device)

    def start(self) -> None:
        """Forget the previous update."""
        self._finite = None
        self.bad_losses = 0

    def see_loss(self, value: float) -> None:
        """Note one micro-batch's loss share (a float)."""
        if not math.isfinite(value):
            self.bad_losses += 1

    def agreed(self) -> tuple[bool, bool]:
        """(a loss was non-finite, a gradient was non-finite) on any rank (a collective)."""
        grad_bad = self._finite is not None and not bool(self._finite)
        loss, grad = dist.all_reduce_max_list([float(self.bad_losses > 0), float(grad_bad)])
        return loss > 0, grad > 0

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _no_update(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def update_suppressed(engine: Any) -> Iterator[None]:
    """Within: `engine.step()` runs DeepSpeed's boundary and gradient cleanup but changes no
    weight, no optimizer state and no learning rate (the torch optimizer's `step` is a no-op,
    the LR scheduler is detached)."""
    optimizers = [engine.basic_optimizer]
    backup = getattr(engine.optimizer, "backup_optimizer", None)  # ZeRO-3 partial offload
    if backup is not None and backup is not engine.basic_optimizer:
        optimizers.append(backup)
    own = [vars(opt).get("step") for opt in optimizers]  # an instance-level step, if any
    scheduler = engine.lr_scheduler
    for opt in optimizers:
        opt.step = _no_update
    engine.lr_scheduler = None
    try:
        yield
    finally:
        engine.lr_scheduler = scheduler
        for opt, step in zip(optimizers, own, strict=True):
            if step is None:
                del opt.step
            else:
                opt.step = step


def data_position(algorithm_state: dict[str, Any] | None) -> list[tuple[int, int]]:
    """(epoch, position) of each prompt stream in an algorithm's state (one per curriculum
    stage; [] when it has none): the rows a step drew are the positions between two of these
    in that epoch's seeded order."""
    if not isinstance(algorithm_state, dict):
        return []
    stream = algorithm_state.get("stream", algorithm_state)
    pools = stream.get("pools", [stream]) if isinstance(stream, dict) else []
    return [
        (int(p["epoch"]), int(p["pos"]))
        for p in pools
        if isinstance(p, dict) and "epoch" in p and "pos" in p
    ]


def describe_rows(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> str:
    """The rows a step drew, from the stream positions before and after it."""
    if not after:
        return "no data position known"
    if len(before) != len(after):
        return "data position now " + ", ".join(f"epoch {e} position {p}" for e, p in after)
    parts = []
    for (e0, p0), (e1, p1) in zip(before, after, strict=True):
        if (e0, p0) == (e1, p1):
            continue
        if e0 == e1:
            parts.append(f"epoch {e0} positions {p0}..{p1 - 1}")
        else:
            parts.append(f"epoch {e0} position {p0} to epoch {e1} position {p1 - 1}")
    return "data rows: " + ("; ".join(parts) if parts else "none drawn")


@dataclass
class BadStep:
    """One skipped step: what was non-finite and which rows it drew."""

    step: int
    loss: bool
    grad: bool
    rows: str
    data_before: list[tuple[int, int]] = field(default_factory=list)
    data_after: list[tuple[int, int]] = field(default_factory=list)

    @property
    def reason(self) -> str:
        """`loss`, `gradient` or both, as words."""
        what = [w for w, bad in (("loss", self.loss), ("gradient", self.grad)) if bad]
        return "non-finite " + (" and ".join(what) or "gradient norm")


class BadSteps:
    """Counts bad steps (in a row and in all) and decides when the run stops.

    Args:
        limit: `train.max_bad_steps`: bad steps in a row that are skipped; one more stops.
        out_dir: the run's output dir (`bad_steps.jsonl`, written by rank 0).
    """

    def __init__(self, limit: int, out_dir: Path) -> None:
        self.limit = limit
        self.out_dir = Path(out_dir)
        self.total = 0  # skipped steps of the whole run (kept in checkpoints)
        self.streak: list[BadStep] = []
        self.before_streak: Snapshot | None = None  # state at the streak's start, if unchanged
        self.applied_in_streak = False  # an update of a bad step applied before its bad one

    def good(self) -> None:
        """A step whose updates all applied: the streak ends."""
        self.streak = []
        self.before_streak = None
        self.applied_in_streak = False

    def bad(self, record: BadStep, snapshot: Snapshot | None, applied: int) -> bool:
        """Note a bad step; True when the run must stop.

        Args:
            record: the step and its data position.
            snapshot: the state noted when the step began (None when none was noted).
            applied: updates of this step applied before its first bad one (PPO epochs); the
                engine then no longer holds the streak's start state.
        """
        self.total += 1
        if not self.streak:
            self.before_streak = snapshot
        if applied:
            self.before_streak = None
            self.applied_in_streak = True
        self.streak.append(record)
        if dist.is_main():
            self._write(record)
            print(f"[posttrain] {self.warning(record)}", file=sys.stderr, flush=True)
        return len(self.streak) > self.limit

    def _write(self, record: BadStep) -> None:
        row = {
            "step": record.step,
            "loss_nonfinite": record.loss,
            "grad_nonfinite": record.grad,
            "data_before": record.data_before,
            "data_after": record.data_after,
            "rows": record.rows,
            "in_a_row": len(self.streak),
        }
        with (self.out_dir / LOG_FILE).open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def warning(self, record: BadStep) -> str:
        """The line printed for one skipped step."""
        return (
            f"step {record.step}: {record.reason}; optimizer update skipped "
            f"({len(self.streak)} in a row, {LIMIT_KEY}={self.limit}); {record.rows}"
        )

    def stop_message(self, path: Path, pre_state: bool) -> str:
        """The one-line reason a run stops (`NumericalError`)."""
        first, last = self.streak[0], self.streak[-1]
        steps = f"step {first.step}" if first is last else f"steps {first.step}-{last.step}"
        if pre_state:
            where = f"checkpoint from before step {first.step}: {path}"
        elif self.applied_in_streak:
            where = f"checkpoint after step {last.step}: {path}"
        else:  # no state noted at the streak's start (async prefetch); the weights are unchanged
            where = (
                f"checkpoint after step {last.step}, with the weights and optimizer from "
                f"before step {first.step} (the bad steps applied no update): {path}"
            )
        return (
            f"{len(self.streak)} bad steps in a row ({steps}; {LIMIT_KEY}={self.limit} allows "
            f"{self.limit}), the first at step {first.step}: {first.reason}, {first.rows}; "
            f"{where} (continue with train.resume={path}; lower optim.lr or check that "
            f"step's rows first)"
        )
