"""Data-parallel rollouts across training ranks: each rank samples a share, every rank gets all.

Under `torchrun` with N ranks every rank owns a colocated rollout engine (one vLLM replica per
rank, on its own GPU/CPU). `ShardedEngine.generate` gives rank r the r-th contiguous block of the
prompts (whole prompts, so all `n` samples of a group come from one engine), samples it with the
seeds the unsharded call would have used (prompt i, sample j: seed + i * n + j, with i the
*global* prompt index), and all-gathers the rollouts, so every rank returns the same
prompt-major list as one engine given all prompts. Rewards, advantages and the per-rank training
shard are then computed from identical data on every rank, exactly as with one rank.

`make_vllm_replica` builds the per-rank vLLM engine. vLLM's `external_launcher` backend uses the
torch.distributed world that posttrain already initialised (gloo/NCCL) instead of starting
workers; with tensor_parallel_size = data_parallel_size = 1 its rank layout
`ExternalDP x DP x PP x PCP x TP` makes every TP/PP/DP group a single rank, and the world's
N ranks are "external DP" replicas that generate independently (different prompts, different
numbers of calls: no collective runs during `generate`). Constructing the engines is collective
(vLLM creates its groups with `new_group` on the world), so every rank builds its replica at the
same point. A plain `LLM()` (default executor) on rank 0 only hangs instead: it joins the world
group and waits for ranks that never build an engine.

Multi-turn episodes (`EpisodeShards`) are split by whole groups instead: each rank plays, on its
own engine, the episodes of its block of the step's tasks (generation, environments, rewards),
every turn seeded as one engine sampling all ranks' running episodes would, and the scored
episodes are all-gathered once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch

from posttrain.errors import RolloutError
from posttrain.rollout.engine import Rollout, SamplingConfig


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous block of n items; the first n % world get one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class RankEngine:
    """Base of the per-rank engine wrappers: anything a wrapper does not define is its rank's
    own engine's (tokenizer, load_weights, urls, ...).

    Args:
        engine: this rank's own engine.
        rank: this rank.
        world: number of ranks.
    """

    def __init__(self, engine: Any, rank: int, world: int) -> None:
        self.engine = engine
        self.rank = rank
        self.world = world

    @property
    def weight_version(self) -> int:
        """The local engine's weight version (every rank records the same one)."""
        return int(self.engine.weight_version)

    def __getattr__(self, name: str) -> Any:
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)


class ShardedEngine(RankEngine):
    """`RolloutEngine` that splits prompts over ranks and all-gathers the rollouts.

    Args:
        engine: this rank's own engine (a vLLM replica).
        rank: this rank.
        world: number of ranks.
        all_gather: `obj -> [obj of rank 0, ..., obj of rank world-1]` (a collective).
    """

    def __init__(
        self,
        engine: Any,
        rank: int,
        world: int,
        all_gather: Callable[[Any], list[Any]],
    ) -> None:
        super().__init__(engine, rank, world)
        self.all_gather = all_gather

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        """Sample this rank's block of prompts, then gather every rank's rollouts.

        Args:
            prompt_ids: the same P prompts on every rank.
            sampling: as for `RolloutEngine.generate`; a seed gives the same samples as one
                engine sampling all P prompts (up to batch-size-dependent float rounding).

        Returns:
            P * n rollouts, prompt-major, `prompt_index` global; identical on every rank.
        """
        start, stop = shard_bounds(len(prompt_ids), self.rank, self.world)
        mine: list[Rollout] = []
        if stop > start:
            mine = self.generate_block(prompt_ids[start:stop], sampling, start)
        return [r for part in self.all_gather(mine) for r in part]

    def generate_block(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, first_index: int
    ) -> list[Rollout]:
        """Sample a block of a larger batch on this rank's engine alone (no collective).

        Args:
            prompt_ids: the block's prompts.
            sampling: the whole batch's settings.
            first_index: the batch index of the block's first prompt: prompt i of the block gets
                the seeds and `prompt_index` of prompt `first_index + i` of the batch.
        """
        local = sampling
        if sampling.seed is not None:
            local = replace(sampling, seed=sampling.seed + first_index * sampling.n)
        out = self.engine.generate(prompt_ids, local)
        for r in out:
            r.prompt_index += first_index
        return out

    def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> float:
        """Load into this rank's engine (every rank calls this with the same weights)."""
        return self.engine.load_weights(named_tensors, version)


def make_vllm_replica(model_path: str, **kw: Any) -> Any:
    """This rank's own vLLM engine inside a multi-rank torch.distributed job.

    Args:
        model_path: model directory or hub name.
        **kw: `VLLMEngine` arguments (max_model_len, seed, kv_cache_gib, ...).

    Returns:
        A `VLLMEngine` with tensor_parallel_size 1 on the `external_launcher` backend (see the
        module docstring for why this makes one independent replica per rank).
    """
    from posttrain.rollout.vllm_local import VLLMEngine

    return VLLMEngine(
        model_path,
        distributed_executor_backend="external_launcher",
        tensor_parallel_size=1,
        data_parallel_size=1,
        **kw,
    )


# (is a RolloutError, message) of a rank whose episodes failed; None: no failure
Failure = tuple[bool, str] | None
BlockGenerate = Callable[[list[list[int]], SamplingConfig, int], list[Rollout]]


def group_all_gather(group: Any) -> Callable[[Any], list[Any]]:
    """`obj -> [obj of rank 0, ..., obj of rank world-1]` on process group `group`."""

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(out, obj, group=group)
        return out

    return gather


class EpisodeShards:
    """A step's multi-turn episodes split over ranks by whole groups (`EpisodeSource`).

    Rank r plays the r-th contiguous block of the step's tasks (`bounds`): the G episodes of each,
    their environments and their rewards; `gather` then gives every rank the whole step, in the
    order one rank would have played it. Each turn is one `generate` call per rank over its
    running episodes; the ranks first all-gather how many each runs, so rank r's episodes get the
    seeds one engine would give them in a single call over every rank's running episodes (the
    block starts after those of ranks < r) and N ranks sample what one does. A rank whose
    episodes have all ended keeps joining those per-turn gathers until every rank's have (`play`).

    Args:
        generate_block: `(prompts, sampling, first_index) -> rollouts` on this rank's engine
            alone, prompt i seeded as prompt `first_index + i` of the whole call.
        rank, world: this rank and the number of ranks.
        all_gather: `obj -> [obj of every rank]`, a collective; on a group of its own, as it may
            run in the `rollout.max_staleness` prefetch thread.
    """

    def __init__(
        self,
        generate_block: BlockGenerate,
        rank: int,
        world: int,
        all_gather: Callable[[Any], list[Any]],
    ) -> None:
        self.generate_block = generate_block
        self.rank = rank
        self.world = world
        self.all_gather = all_gather

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's block of n tasks."""
        return shard_bounds(n, self.rank, self.world)

    def gather(self, obj: Any, n: int) -> list[tuple[int, Any]]:
        """Every rank's `obj` about its block of n tasks, with the block's start, in rank order."""
        parts = self.all_gather(obj)
        return [(shard_bounds(n, r, self.world)[0], part) for r, part in enumerate(parts)]

    def play(self, run: Callable[[Any], Any]) -> Any:
        """`run(engine)` with this rank's per-turn engine, then the gathers of the other ranks'
        remaining turns. A failure on any rank raises on every rank (RolloutError where every
        failure was one, e.g. a rollout server's)."""
        engine = _TurnEngine(self)
        try:
            out = run(engine)
        except Exception as err:
            if not engine.stopped:  # this rank's own failure: the others raise at their next turn
                engine.round(0, (isinstance(err, RolloutError), f"rank {self.rank}: {err}"))
            raise
        while any(engine.checked(engine.round(0, None))):
            pass
        return out


class _TurnEngine:
    """The engine `run_episodes` gets on one rank under `EpisodeShards.play`."""

    def __init__(self, shards: EpisodeShards) -> None:
        self.shards = shards
        self.stopped = False  # a rank failed: no more rounds

    def round(self, count: int, failure: Failure) -> list[tuple[int, Failure]]:
        """One per-turn gather: (running episodes, failure) of every rank."""
        return self.shards.all_gather((count, failure))

    def checked(self, parts: list[tuple[int, Failure]]) -> list[int]:
        """Each rank's running episodes; raises a failure of any rank."""
        failed = [f for _, f in parts if f is not None]
        if failed:
            self.stopped = True
            message = "episodes failed on a training rank:\n" + "\n".join(m for _, m in failed)
            raise RolloutError(message) if all(r for r, _ in failed) else RuntimeError(message)
        return [c for c, _ in parts]

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        """This rank's running episodes, seeded after those of the ranks before it."""
        counts = self.checked(self.round(len(prompt_ids), None))
        first = sum(counts[: self.shards.rank])
        return self.shards.generate_block(prompt_ids, sampling, first)
