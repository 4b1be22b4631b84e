"""Asynchronous rollouts with bounded staleness (`rollout.max_staleness: k`, k >= 1).

A single background thread generates the batches of the coming steps, in step order, while the
trainer trains; the engine may run up to k batches ahead of the trainer:

    engine holds weight version w      the batch of step m may be generated iff m <= w + k
    collect_groups(step n):            take batch n from the queue (generate it if absent),
                                       then queue every allowed batch not queued yet
    train step n                       (overlaps the generation of the queued batches)
    sync_weights(version n + 1):       push only when the window is used up (n + 1 >= w + k),
                                       at the last step, or before an eval (`train.eval_every`)

The batch of step m is trained at trainer version m, so its staleness m - w_m (w_m: the version
it was sampled with) is at most k by construction. Pushes happen only when the queue needs a
fresher version: one push every k steps (a push is a full weight stream, for a server a file
write and reload), not after every step. Each push waits for every queued generation first, so
pushes never overlap a generation, each rollout's `weight_version` is exact, and the staleness
sequence is deterministic: 0 at the first step, then 1, 2, ..., k, 1, 2, ..., k, ... (k = 1:
generate step n+1 while step n trains, push after every step). The bound is still checked on
every batch: a batch sampled more than k versions behind the trainer is dropped together with
everything queued behind it (their prompts come after it), the prompt stream is rewound to
before it and it is generated again (`rollout/stale_regenerated`, `rollout/stale_dropped`).
Each step logs `rollout/staleness/mean` and `/max` (trainer version minus each sample's weight
version) and `rollout/queued` (batches generated or generating ahead of the trainer).

The loss stays correct off-policy: GRPO/PPO recompute `logp_old` with the trainer's current
weights (or take the detached current log-probs), so the clipped ratio is taken against the
current policy, and `loss.tis_cap` reweights each token by min(exp(logp_old - logp_roll), cap):
the truncated importance weight between the current policy and the stale sampler (or
`loss.rollout_correction` masks what is too far off: `posttrain.off_policy`).

A checkpoint (`state_dict`) waits for every queued generation, makes sure every batch the window
allows is queued and generated, and saves those generated-but-untrained batches (their groups,
metrics and drawn rows), the stream state after them and the engine's weight version w, each
rank its own (`checkpoint.RANK_STATE`: `rank_state{r}.pt`, not trainer_state.json, which keeps
the position from before the oldest queued batch). A resumed run puts them back in the queue as
finished jobs, so it trains exactly the batches the straight run trained, with their staleness:
any batch beyond w + k needs a push first, and that push sends the then-current trainer weights,
as in the straight run. The new engine does not hold the weights of version w, but it generates
nothing before the next push (every batch w allows is in the queue; evals and the last step
push first); the resume itself pushes the checkpoint's weights only where the straight run
pushed at that step (eval step, last step), under the same version label. Waiting changes no
result: a batch depends only on the weights it was sampled with and its step's seed
(`step_sampling`). Without its rank state (a failed generation in the queue at save time, a
checkpoint of another rank count or of an older posttrain) the resumed run falls back: it
generates the prefetched batches again, after pushing the checkpoint's weights. Rewards
that read the policy's own entropy (RENT's `token_entropy` column) and OPO (exactly on-policy)
are not allowed: both need the weights of the step being trained.
"""

from __future__ import annotations

import copy
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from posttrain.errors import ConfigError
from posttrain.rollout.source import RolloutSource
from posttrain.runtime import distributed as dist
from posttrain.runtime import phase_trace
from posttrain.runtime.checkpoint import RANK_STATE


class _Job:
    """One queued batch: its step, the future of its generation, the stream state before it."""

    def __init__(self, step: int, version: int) -> None:
        self.step = step
        self.version = version  # the engine's weight version when it was queued
        self.future: Future | None = None
        self.stream_before: dict[str, Any] | None = None  # set by the worker as it starts
        self.drawn: Any = None  # the rows its generation drew (`RolloutSource.drawn_rows`)


class AsyncRolloutSource:
    """A `RolloutSource` whose engine generates up to k batches ahead of the trainer.

    Args:
        source: the synchronous `RolloutSource` (prompt stream, engine, rewards).
        max_staleness: k >= 1, the largest allowed trainer version minus sample version.
        total_steps: `train.steps` (no batch is queued past the last step).
    """

    def __init__(self, source: RolloutSource, max_staleness: int, total_steps: int) -> None:
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
        self.queue: deque[_Job] = deque()  # in step order
        self.next_step: int | None = None  # the next batch to queue (None: not known yet)
        self.trainer_version = int(source.weight_version)  # the last version sync_weights got
        self.must_push = False  # after a resume: the engine does not hold the state's weights
        self._drawn: Any = None  # the rows of the batch `collect_groups` returned last

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding id (the source's)."""
        return self.source.pad_id

    @property
    def engine(self) -> Any:
        """The rollout engine (the source's)."""
        return self.source.engine

    @property
    def weight_version(self) -> int:
        """The weight version the engine last received (the source's)."""
        return self.source.weight_version

    # ------------------------------------------------------------------ queue
    def _generate(self, job: _Job) -> tuple[list[list[Any]], dict]:
        """Worker thread: remember the stream position, then generate the job's batch."""
        job.stream_before = copy.deepcopy(self.source.stream.state_dict())
        with phase_trace.span("async prefetch"):  # POSTTRAIN_PHASE_TRACE (opt-in)
            return self.source.collect_groups(job.step)

    def _generate_noted(self, job: _Job) -> tuple[list[list[Any]], dict]:
        """Worker thread: `_generate`, then note the rows it drew (data_ids.jsonl)."""
        try:
            return self._generate(job)
        finally:
            noted = getattr(self.source, "drawn_rows", None)  # None: a source without data ids
            job.drawn = noted() if noted is not None else None

    def _fill(self) -> None:
        """Queue every batch the engine's weights may generate (step <= version + k)."""
        if self.next_step is None:  # before the first collect_groups (or after a resume)
            return
        version = int(self.source.weight_version)
        while self.next_step < self.total_steps and self.next_step <= version + self.max_staleness:
            job = _Job(self.next_step, version)
            job.future = self.pool.submit(self._generate_noted, job)
            self.queue.append(job)
            self.next_step += 1

    def _wait_all(self) -> None:
        """Block until no generation runs (a failed one raises only where it is consumed).

        Batches queued behind a failed one still run (and fail the same way): under torchrun
        every rank then runs the same collectives of `RankedServerEngine`.
        """
        for job in self.queue:
            assert job.future is not None
            job.future.exception()

    def _drop_all(self, restore: bool) -> int:
        """Forget the queue; with `restore`, rewind the prompt stream to before its first batch.

        Returns:
            The number of batches dropped.
        """
        self._wait_all()
        dropped = len(self.queue)
        if restore and self.queue and self.queue[0].stream_before is not None:
            self.source.stream.load_state_dict(self.queue[0].stream_before)
        if self.queue:
            self.next_step = self.queue[0].step
        self.queue.clear()
        return dropped

    def _take(self, step: int) -> tuple[list[list[Any]], dict, dict[str, Any] | None]:
        """Step `step`'s batch from the head of the queue (it leaves only once it succeeded).

        Returns:
            (groups, metrics, the stream state from before the batch).

        Raises:
            RuntimeError: the engine's weights are too old to generate `step` (more than k
                versions behind: weights were not pushed through `sync_weights`).
        """
        if not self.queue or self.queue[0].step != step:
            raise RuntimeError(
                f"the rollout engine holds weight version {self.source.weight_version}, too old "
                f"to generate step {step} with rollout.max_staleness={self.max_staleness}: "
                "sync_weights must push first"
            )
        job = self.queue[0]
        assert job.future is not None
        groups, metrics = job.future.result()
        self.queue.popleft()
        self._drawn = job.drawn
        return groups, metrics, job.stream_before

    # -------------------------------------------------------------- interface
    def collect_groups(self, step: int, model: Any = None) -> tuple[list[list[Any]], dict]:
        """This step's groups (queued earlier if possible); then queue what the window allows.

        Args:
            step: the optimizer-step batch index.
            model: unused (no entropy rewards in async mode).

        Returns:
            (groups, metrics) as `RolloutSource.collect_groups`, plus `rollout/staleness/mean`,
            `rollout/staleness/max`, `rollout/stale_regenerated`, `rollout/stale_dropped` and
            `rollout/queued`.

        Raises:
            RuntimeError: the engine's weights are too old to generate `step` at all.
        """
        version = self.trainer_version
        dropped = 0
        if not self.queue or self.queue[0].step != step:  # first step, resume, out of order
            self._drop_all(restore=True)
            self.next_step = step
        self._fill()
        groups, metrics, before = self._take(step)
        if _max_staleness(groups, version) > self.max_staleness:  # e.g. a version jump
            dropped = 1 + self._drop_all(restore=False)  # the rest of the queue came after it
            if before is not None:
                self.source.stream.load_state_dict(before)  # the same prompts, sampled again
            self.next_step = step
            self._fill()
            groups, metrics, _ = self._take(step)
        stale = [version - s.rollout.weight_version for g in groups for s in g]
        metrics["rollout/staleness/mean"] = sum(stale) / max(len(stale), 1)
        metrics["rollout/staleness/max"] = float(max(stale, default=0))
        metrics["rollout/stale_regenerated"] = float(dropped > 0)
        metrics["rollout/stale_dropped"] = float(dropped)
        self._fill()
        metrics["rollout/queued"] = float(len(self.queue))
        return groups, metrics

    def _needs_push(self, version: int) -> bool:
        """Push now: after a resume, when the window is used up, at the end, or before an eval."""
        cfg = self.source.cfg
        every = cfg.train.eval_every if cfg.eval.num_problems > 0 else 0
        return (
            self.must_push
            or version >= int(self.source.weight_version) + self.max_staleness
            or version >= self.total_steps
            or bool(every and version % every == 0)
        )

    def sync_weights(self, model: Any, version: int) -> dict[str, float]:
        """Push the trainer's weights (version `version`) when the queue needs them.

        A push first waits for every queued generation (they keep the version they started
        with), then the window is refilled with the new weights.

        Returns:
            The push's metrics (`weight_version` = the engine's version, pushed or not) and
            `rollout/pushed` (1.0 when this call pushed).
        """
        self.trainer_version = version
        if not self._needs_push(version):
            return {"weight_version": float(self.source.weight_version), "rollout/pushed": 0.0}
        self._wait_all()
        metrics = self.source.sync_weights(model, version)
        self.must_push = False
        self._fill()
        return {**metrics, "rollout/pushed": 1.0}

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy; waits for queued generations first (one engine user at a time).

        Raises:
            RuntimeError: the engine does not hold the trainer's weights (never after
                `sync_weights` at an eval step).
        """
        self._wait_all()
        if int(self.source.weight_version) != self.trainer_version:
            raise RuntimeError(
                f"evaluation would use rollout weights version {self.source.weight_version}, "
                f"not the trainer's {self.trainer_version}"
            )
        return self.source.evaluate()

    def pass_counts(self, n: int) -> list[list[int]] | None:
        """The pass@k curve's counts (`RolloutSource.pass_counts`), after the queued generations.

        Raises:
            RuntimeError: the engine does not hold the trainer's weights.
        """
        self._wait_all()
        if int(self.source.weight_version) != self.trainer_version:
            raise RuntimeError(
                f"the pass@k curve would use rollout weights version "
                f"{self.source.weight_version}, not the trainer's {self.trainer_version}"
            )
        return self.source.pass_counts(n)

    def drawn_rows(self) -> Any:
        """The rows of the batch the last `collect_groups` returned (not of those queued)."""
        drawn, self._drawn = self._drawn, None
        return drawn

    def state_dict(self) -> dict[str, Any]:
        """The source's state (prompt position from before the oldest queued batch) and, under
        `RANK_STATE`, this rank's prefetched batches (`_prefetched`)."""
        self._fill()  # the window is full after every step already: a no-op then
        self._wait_all()
        state = self.source.state_dict()
        prefetched = self._prefetched(state)
        if self.queue and self.queue[0].stream_before is not None:
            state = {**state, "stream": self.queue[0].stream_before}
        if prefetched is not None:
            state[RANK_STATE] = prefetched
        return state

    def _prefetched(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """The generated, untrained batches and what continues after them (None: a failed
        generation in the queue, or the queue not started: the resumed run generates again)."""
        if self.next_step is None or any(j.future.exception() is not None for j in self.queue):
            return None
        jobs = [
            {
                "step": j.step,
                "version": j.version,
                "stream_before": j.stream_before,
                "result": j.future.result(),
                "drawn": j.drawn,
            }
            for j in self.queue
        ]
        return {
            "jobs": jobs,
            "next_step": self.next_step,
            "stream": copy.deepcopy(state["stream"]),  # after the queued batches
            "weight_version": int(self.source.weight_version),
            "world_size": dist.world_size(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the source and the prefetched batches (`state_dict`); without them the queue
        is dropped and the next `sync_weights` pushes."""
        self._drop_all(restore=False)
        self.next_step = None
        self.source.load_state_dict(state)
        self.trainer_version = int(self.source.weight_version)
        prefetched = state.get(RANK_STATE)
        if prefetched is None or prefetched["world_size"] != dist.world_size():
            self.must_push = True
            return
        self.must_push = False
        self.source.stream.load_state_dict(prefetched["stream"])
        self.source.weight_version = int(prefetched["weight_version"])
        for saved in prefetched["jobs"]:
            job = _Job(int(saved["step"]), int(saved["version"]))
            job.stream_before, job.drawn = saved["stream_before"], saved["drawn"]
            job.future = Future()
            job.future.set_result(saved["result"])
            self.queue.append(job)
        self.next_step = int(prefetched["next_step"])


def _max_staleness(groups: list[list[Any]], version: int) -> int:
    return max((version - s.rollout.weight_version for g in groups for s in g), default=0)
