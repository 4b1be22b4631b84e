"""Asynchronous rollouts with bounded staleness (`rollout.max_staleness: k`, k >= 1).

    make_batch(n):  groups(n) = the prefetched batch (or generated now), then start
                    generating groups(n+1) in a background thread with the current weights
    train step n    (overlaps the generation of step n+1)
    after_step:     wait for the background generation, then push weights version n+1

So the batch trained at step n+1 was sampled with weights version n: staleness 1. The
prefetch is one batch deep (a deeper queue would let the engine run further ahead of the
trainer, not bound it tighter), so the staleness is at most 1 <= k for every k >= 1; the bound
is still checked on every batch: a batch whose rollouts are more than k versions behind the
trainer (e.g. after a resume) is dropped and generated again, synchronously
(`rollout/stale_regenerated`). Each step logs `rollout/staleness/mean` and `/max` (trainer
version minus each sample's weight version).

The loss stays correct off-policy: GRPO/PPO recompute `logp_old` with the trainer's current
weights (or take the detached current log-probs), so the clipped ratio is taken against the
current policy, and `loss.tis_cap` reweights each token by min(exp(logp_old - logp_roll), cap):
the truncated importance weight between the current policy and the stale sampler.

Weight pushes never overlap a generation (the push waits for it), so a rollout's
`weight_version` is exact. Checkpoints store the prompt position from before the prefetch, so
a resumed run generates the prefetched batch again. Rewards that read the policy's own
entropy (RENT's `token_entropy` column) and OPO (exactly on-policy) are not allowed: both need
the weights of the step being trained.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from posttrain.errors import ConfigError


class AsyncRolloutSource:
    """A `RolloutSource` whose next batch is generated while the current one trains.

    Args:
        source: the synchronous `RolloutSource` (prompt stream, engine, rewards).
        max_staleness: k >= 1, the largest allowed trainer version minus sample version.
        total_steps: `train.steps` (no batch is prefetched past the last step).
    """

    def __init__(self, source: Any, max_staleness: int, total_steps: int) -> None:
        if max_staleness < 1:
            raise ConfigError(f"rollout.max_staleness={max_staleness}: async needs >= 1")
        if source.needs_entropy:
            raise ConfigError(
                "rollout.max_staleness > 0 cannot be used with rewards that read the policy's "
                "token entropy (token_entropy column, e.g. neg_entropy): set it to 0"
            )
        if source.cfg.advantage.estimator == "opo":
            raise ConfigError(
                "advantage.estimator=opo trains exactly on-policy: use rollout.max_staleness=0"
            )
        self.source = source
        self.max_staleness = max_staleness
        self.total_steps = total_steps
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rollout-prefetch")
        self.pending: tuple[int, Future] | None = None  # (step, future of collect_groups)
        self.stream_before: dict[str, Any] | None = None  # stream state before the prefetch

    def __getattr__(self, name: str) -> Any:
        """Everything else (engine, pad_id, evaluate, weight_version, ...) is the source's."""
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def collect_groups(self, step: int, model: Any = None) -> tuple[list[list[Any]], dict]:
        """This step's groups (prefetched if possible); then start prefetching step + 1.

        Args:
            step: the optimizer-step batch index.
            model: unused (no entropy rewards in async mode).

        Returns:
            (groups, metrics) as `RolloutSource.collect_groups`, plus `rollout/staleness/mean`,
            `rollout/staleness/max` and `rollout/stale_regenerated`.
        """
        groups, metrics = None, {}
        version = self.source.weight_version
        regenerated = 0.0
        if self.pending is not None and self.pending[0] == step:
            groups, metrics = self.pending[1].result()
            if _max_staleness(groups, version) > self.max_staleness:
                groups, regenerated = None, 1.0  # too stale: the same prompts, sampled again
        self._drop_pending(restore=groups is None)
        if groups is None:
            groups, metrics = self.source.collect_groups(step)
        stale = [version - s.rollout.weight_version for g in groups for s in g]
        metrics["rollout/staleness/mean"] = sum(stale) / max(len(stale), 1)
        metrics["rollout/staleness/max"] = float(max(stale, default=0))
        metrics["rollout/stale_regenerated"] = regenerated
        if step + 1 < self.total_steps:
            self.stream_before = copy.deepcopy(self.source.stream.state_dict())
            future = self.pool.submit(self.source.collect_groups, step + 1)
            self.pending = (step + 1, future)
        return groups, metrics

    def _drop_pending(self, restore: bool) -> None:
        """Forget the prefetch; with `restore`, rewind the prompt stream to before it."""
        if self.pending is not None:
            _wait(self.pending[1])
            if restore and self.stream_before is not None:
                self.source.stream.load_state_dict(self.stream_before)
        self.pending, self.stream_before = None, None

    def sync_weights(self, model: Any, version: int) -> dict[str, float]:
        """Wait for the running generation (it keeps its version), then push the new weights."""
        if self.pending is not None:
            _wait(self.pending[1])
        return self.source.sync_weights(model, version)

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy; waits for a running generation first (one engine user at a time)."""
        if self.pending is not None:
            _wait(self.pending[1])
        return self.source.evaluate()

    def state_dict(self) -> dict[str, Any]:
        """The source's state, with the prompt position from before a pending prefetch."""
        if self.pending is not None:
            _wait(self.pending[1])
        state = self.source.state_dict()
        if self.stream_before is not None:
            state = {**state, "stream": self.stream_before}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the source (a pending prefetch is dropped)."""
        self._drop_pending(restore=False)
        self.source.load_state_dict(state)


def _wait(future: Future) -> None:
    """Block until `future` is done; its exception (if any) surfaces when it is consumed."""
    future.exception()


def _max_staleness(groups: list[list[Any]], version: int) -> int:
    return max((version - s.rollout.weight_version for g in groups for s in g), default=0)
