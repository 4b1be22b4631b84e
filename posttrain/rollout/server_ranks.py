"""`rollout.engine: server` under torchrun: every rank samples, rank 0 alone pushes weights.

`RankedServerEngine` wraps one `ServerEngine` per training rank (all talking to the same vLLM
servers):

- generate: rank 0 first checks the servers' weight fingerprints (re-pushing a restarted server
  from the kept file) and broadcasts the outcome; then rank r sends the r-th contiguous block of
  the prompts (whole prompts, so all n samples of a group come from one request; blocks as
  `posttrain.rollout.sharded.shard_bounds`) with the seeds, servers and prompt indices the
  unsharded call would have used (`ServerEngine.generate(first_index=...)`), and the rollouts
  are all-gathered: every rank returns the same prompt-major list, as the colocated
  `ShardedEngine` does.
- load_weights: every rank reads the whole weight stream (ZeRO-3 gathers are collective), only
  rank 0 hands it to its engine (file + reload, or NCCL) and checks the fingerprints; rank 0 then
  broadcasts its status (this is also the barrier), and every rank records the same
  `weight_version`.

Failures never leave a rank waiting in a collective: a rank whose server call fails still joins
the gather/broadcast, carrying its error, and then every rank raises the same
`RolloutServerError` (the trainer turns it into a resumable checkpoint on all ranks).

The collectives run on a private gloo group, so generation in `rollout.max_staleness` > 0's
background thread cannot interleave with the trainer's own collectives on the default group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

from posttrain.errors import RolloutError
from posttrain.rollout.engine import Rollout, SamplingConfig
from posttrain.rollout.sharded import RankEngine, shard_bounds
from posttrain.rollout.vllm_server import RolloutServerError, ServerEngine

T = TypeVar("T")
# (is a RolloutError, message) of a failed call, or None.
Status = tuple[bool, str] | None


def _attempt(fn: Callable[[], T], rank: int) -> tuple[T | None, Status]:
    """Run fn; (its result, None) or (None, the failure as a picklable status)."""
    try:
        return fn(), None
    except Exception as err:  # sent to the other ranks, raised on all of them
        return None, (isinstance(err, RolloutError), f"rank {rank}: {err}")


def _raise_any(statuses: list[Status]) -> None:
    """Raise the first failure on every rank: RolloutServerError if all were rollout errors."""
    failed = [s for s in statuses if s is not None]
    if not failed:
        return
    message = "\n".join(m for _, m in failed)
    if all(is_rollout for is_rollout, _ in failed):
        raise RolloutServerError(message)
    raise RuntimeError(f"rollout server engine failed on a training rank:\n{message}")


class RankedServerEngine(RankEngine):
    """`RolloutEngine` over vLLM servers shared by all training ranks (see module docstring).

    Args:
        engine: this rank's `ServerEngine` (its own `verify_weights` is turned off; rank 0
            checks before every generate when `verify_weights` is True).
        rank, world: this rank and the number of ranks.
        group: process group for the status/rollout collectives (None: a new gloo group;
            creating it is collective, so every rank builds its engine at the same point).
        verify_weights: rank 0 checks the servers' fingerprints before each generate.
    """

    def __init__(
        self,
        engine: ServerEngine,
        rank: int,
        world: int,
        group: Any = None,
        verify_weights: bool = True,
    ) -> None:
        super().__init__(engine, rank, world)
        self.group = group if group is not None else torch.distributed.new_group(backend="gloo")
        self.verify_weights = verify_weights
        engine.verify_weights = False

    # ------------------------------------------------------------ collectives
    def _broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        box = [obj]
        src = torch.distributed.get_global_rank(self.group, 0)
        torch.distributed.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def _all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    # ------------------------------------------------------------ generation
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        """Sample this rank's block of the prompts on the servers, gather every rank's.

        Args:
            prompt_ids: the same P prompts on every rank.
            sampling: as `ServerEngine.generate` (prompt i, sample j: seed + i * n + j).

        Returns:
            P * n rollouts, prompt-major, `prompt_index` global; identical on every rank.

        Raises:
            RolloutServerError: on every rank, when any rank's server call failed (or rank 0
                found a server with unknown weights it could not restore).
        """
        status: Status = None
        if self.rank == 0 and self.verify_weights:
            _, status = _attempt(self.engine.check_versions, self.rank)
        _raise_any([self._broadcast(status)])
        start, stop = shard_bounds(len(prompt_ids), self.rank, self.world)
        mine: list[Rollout] | None = []
        status = None
        if stop > start:
            mine, status = _attempt(
                lambda: self.engine.generate(prompt_ids[start:stop], sampling, first_index=start),
                self.rank,
            )
        parts = self._all_gather((mine if status is None else [], status))
        _raise_any([s for _, s in parts])
        return [r for part, _ in parts for r in part]

    # --------------------------------------------------------------- weights
    def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> float:
        """Every rank reads the stream; rank 0 pushes it; all record `version`.

        Args:
            named_tensors: the full weights (the same stream on every rank: under ZeRO-3 each
                bucket is a collective gather, so every rank must read all of it).
            version: the new weight version.

        Returns:
            Seconds taken on this rank.

        Raises:
            RolloutServerError: on every rank, when rank 0's push failed.
        """
        start = time.perf_counter()
        stream = iter(named_tensors)
        status: Status = None
        if self.rank == 0:
            _, status = _attempt(lambda: self.engine.load_weights(stream, version), self.rank)
        for _ in stream:  # the rest (all of it on ranks > 0): keep the gathers collective
            pass
        _raise_any([self._broadcast(status)])  # also the barrier: rank 0's push is done
        self.engine.weight_version = version
        return time.perf_counter() - start

    def load_from_path(self, path: str | Path, version: int = 0) -> float:
        """Rank 0 pushes an HF model directory's weights (`ServerEngine.load_from_path`)."""
        start = time.perf_counter()
        status: Status = None
        if self.rank == 0:
            _, status = _attempt(lambda: self.engine.load_from_path(path, version), self.rank)
        _raise_any([self._broadcast(status)])
        self.engine.weight_version = version
        return time.perf_counter() - start

    def close(self) -> None:
        """Close this rank's engine (the servers keep running)."""
        self.engine.close()


def make_server_engine(
    urls: str | list[str],
    *,
    model_path: str,
    rank: int = 0,
    world: int = 1,
    **kw: Any,
) -> ServerEngine | RankedServerEngine:
    """The run's server rollout engine, with version 0 = the weights at `model_path`.

    Args:
        urls: server URLs (`rollout.server_url`).
        model_path: the run's starting weights; a local directory is pushed to the servers
            (rank 0) so that version 0 is it, whatever an earlier run left in them.
        rank, world: this training rank and the number of ranks (> 1: `RankedServerEngine`;
            every rank must call this at the same point).
        **kw: `ServerEngine` arguments (weights_dir, timeout_s, tokenizer, weight_transfer,
            nccl_address, nccl_port, ...).

    Returns:
        A `ServerEngine` (one rank) or a `RankedServerEngine`.
    """
    verify = kw.pop("verify_weights", True)
    if world == 1:
        engine: Any = ServerEngine(urls, verify_weights=verify, **kw)
    else:
        group = torch.distributed.new_group(backend="gloo")
        local, status = _attempt(
            lambda: ServerEngine(urls, verify_weights=verify and rank == 0, **kw), rank
        )
        statuses: list[Status] = [None] * world
        torch.distributed.all_gather_object(statuses, status, group=group)
        _raise_any(statuses)  # a rank that cannot reach the servers stops all of them
        engine = RankedServerEngine(local, rank, world, group, verify_weights=verify)
    if Path(model_path).is_dir():
        engine.load_from_path(model_path, 0)
    return engine
