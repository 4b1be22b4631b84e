"""ShardedEngine: N ranks sampling blocks of prompts give exactly one engine's rollouts.

Ranks are simulated with threads and a barrier-based all-gather; the fake engine's samples are a
pure function of (prompt, per-sample seed), like a seeded vLLM request.
"""

from __future__ import annotations

import itertools
import threading

import pytest

from posttrain.rollout.engine import Rollout, SamplingConfig
from posttrain.rollout.sharded import ShardedEngine, shard_bounds


class SeededFake:
    """Prompt i, sample j -> completion [sum(prompt), seed + i * n + j] (seed None -> -1)."""

    def __init__(self) -> None:
        self.weight_version = 0
        self.calls: list[int] = []
        self.tokenizer = "tok"

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        self.calls.append(len(prompt_ids))
        out = []
        for i, p in enumerate(prompt_ids):
            for j in range(sampling.n):
                s = -1 if sampling.seed is None else sampling.seed + i * sampling.n + j
                out.append(Rollout(i, list(p), [sum(p), s], [-0.5, -0.25], "", "stop", 0))
        return out

    def load_weights(self, named_tensors, version: int) -> float:
        self.weight_version = version
        return 0.0


class ThreadGather:
    """all_gather over `world` threads (one call per thread per round)."""

    def __init__(self, world: int) -> None:
        self.slots: list[object] = [None] * world
        self.barrier = threading.Barrier(world)

    def for_rank(self, rank: int):
        def gather(obj: object) -> list[object]:
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out

        return gather


def run_ranks(world: int, prompts: list[list[int]], sampling: SamplingConfig) -> list[list]:
    gather = ThreadGather(world)
    fakes = [SeededFake() for _ in range(world)]
    engines = [ShardedEngine(fakes[r], r, world, gather.for_rank(r)) for r in range(world)]
    results: list[list] = [[] for _ in range(world)]

    def run(r: int) -> None:
        results[r] = engines[r].generate(prompts, sampling)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sum(sum(f.calls) for f in fakes) == len(prompts)  # each prompt sampled once
    assert all(len(f.calls) <= 1 for f in fakes)  # an empty block makes no call
    return results


def as_tuples(rollouts: list[Rollout]) -> list[tuple]:
    return [(r.prompt_index, tuple(r.prompt_ids), tuple(r.completion_ids)) for r in rollouts]


def test_shard_bounds_cover_everything_once():
    for n in range(0, 12):
        for world in (1, 2, 3, 4):
            blocks = [shard_bounds(n, r, world) for r in range(world)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
            sizes = [b - a for a, b in blocks]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("world", "n_prompts"), [(2, 4), (2, 5), (3, 4), (4, 3)])
def test_sharded_equals_one_engine(world, n_prompts):
    prompts = [[i, i + 1, 7] for i in range(n_prompts)]
    sampling = SamplingConfig(n=3, max_new_tokens=4, seed=100)
    expected = as_tuples(SeededFake().generate(prompts, sampling))
    for result in run_ranks(world, prompts, sampling):
        assert as_tuples(result) == expected  # same data, same order, on every rank


def test_delegation_and_weights():
    fake = SeededFake()
    engine = ShardedEngine(fake, 0, 1, lambda obj: [obj])
    assert engine.tokenizer == "tok"
    engine.load_weights([], version=3)
    assert engine.weight_version == 3
    out = engine.generate([[1, 2]], SamplingConfig(n=2, seed=None))
    assert [r.completion_ids[1] for r in out] == [-1, -1]
