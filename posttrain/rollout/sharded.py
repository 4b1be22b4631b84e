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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch

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
            local = sampling
            if sampling.seed is not None:
                local = replace(sampling, seed=sampling.seed + start * sampling.n)
            mine = self.engine.generate(prompt_ids[start:stop], local)
            for r in mine:
                r.prompt_index += start
        return [r for part in self.all_gather(mine) for r in part]

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
