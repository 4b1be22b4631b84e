"""Async rollouts with bounded staleness (a fake source) and the server/async config checks."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.rollout.async_source import AsyncRolloutSource
from posttrain.rollout.engine import Rollout, RolloutServerError
from posttrain.rollout.source import Sample
from posttrain.runtime.checkpoint import RANK_STATE


class FakeStream:
    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


class FakeSource:
    """Each batch takes the next prompt position and stamps the current weight version."""

    def __init__(
        self, estimator: str = "grpo", needs_entropy: bool = False, eval_every: int = 0
    ) -> None:
        self.cfg = SimpleNamespace(
            advantage=SimpleNamespace(estimator=estimator),
            train=SimpleNamespace(eval_every=eval_every),
            eval=SimpleNamespace(num_problems=8),
        )
        self.needs_entropy = needs_entropy
        self.stream = FakeStream()
        self.weight_version = 0
        self.calls: list[tuple[int, int, str]] = []  # (step, version, thread name)
        self.pushes: list[int] = []
        self.generating = threading.Event()

    def collect_groups(self, step: int, model: Any = None) -> tuple[list[list[Sample]], dict]:
        self.generating.set()
        time.sleep(0.02)
        position = self.stream.position
        self.stream.position += 1
        self.calls.append((step, self.weight_version, threading.current_thread().name))
        rollout = Rollout(position, [1], [2], [-0.5], "x", "stop", self.weight_version)
        self.generating.clear()
        return [[Sample(rollout, 1.0, True)]], {"step": float(step)}

    def sync_weights(self, model: Any, version: int) -> dict[str, float]:
        assert not self.generating.is_set(), "a weight push overlapped a generation"
        self.weight_version = version
        self.pushes.append(version)
        return {"weight_version": float(version)}

    def evaluate(self) -> dict[str, float]:
        assert not self.generating.is_set(), "an eval overlapped a generation"
        return {"eval/version": float(self.weight_version)}

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "weight_version": self.weight_version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.weight_version = state["weight_version"]


def run_steps(source: AsyncRolloutSource, steps: range) -> list[dict[str, float]]:
    """What the trainer does per step: collect the batch, (train), push version step + 1."""
    history = []
    for step in steps:
        groups, metrics = source.collect_groups(step)
        assert metrics["step"] == step
        metrics["prompt"] = groups[0][0].rollout.prompt_index
        metrics.update(source.sync_weights(None, step + 1))
        history.append(metrics)
    return history


@pytest.mark.parametrize(
    ("k", "staleness", "pushes"),
    [
        (1, [0, 1, 1, 1, 1, 1, 1], [1, 2, 3, 4, 5, 6, 7]),
        (2, [0, 1, 2, 1, 2, 1, 2], [2, 4, 6, 7]),
        (3, [0, 1, 2, 3, 1, 2, 3], [3, 6, 7]),
    ],
)
def test_engine_runs_up_to_k_batches_ahead(k, staleness, pushes):
    fake = FakeSource()
    source = AsyncRolloutSource(fake, max_staleness=k, total_steps=7)
    history = run_steps(source, range(7))
    assert [m["rollout/staleness/max"] for m in history] == staleness
    assert [m["rollout/staleness/mean"] for m in history] == staleness
    assert all(m["rollout/staleness/max"] <= k for m in history)
    assert all(m["rollout/stale_regenerated"] == 0.0 for m in history)
    assert [m["prompt"] for m in history] == list(range(7))  # prompts in order, none skipped
    # Pushes only when the window of k batches is used up, and after the last step.
    assert fake.pushes == pushes
    assert [m["rollout/pushed"] for m in history] == [float(v in pushes) for v in range(1, 8)]
    # Batch m is sampled with the version pushed last before it was queued; the engine never
    # runs more than k batches ahead of the trainer.
    sampled = [0] + [(m - 1) // k * k for m in range(1, 7)]
    assert [c[:2] for c in fake.calls] == list(zip(range(7), sampled, strict=True))
    assert all(c[2].startswith("rollout-prefetch") for c in fake.calls)
    assert all(m["rollout/queued"] <= k for m in history)
    assert history[0]["rollout/queued"] == min(k, 6)


def test_the_queue_fills_while_the_trainer_trains():
    fake = FakeSource()
    source = AsyncRolloutSource(fake, max_staleness=3, total_steps=10)
    source.collect_groups(0)
    # "Training": the worker generates steps 1..3 meanwhile, with no call from the trainer.
    assert [(job.step, job.version) for job in source.queue] == [(1, 0), (2, 0), (3, 0)]
    for job in source.queue:
        job.future.result(timeout=30)
    time.sleep(0.1)  # and it stops there: step 4 needs newer weights
    assert [c[0] for c in fake.calls] == [0, 1, 2, 3]
    assert source.sync_weights(None, 1) == {"weight_version": 0.0, "rollout/pushed": 0.0}
    groups, _ = source.collect_groups(1)
    assert groups[0][0].rollout.prompt_index == 1


def test_eval_steps_and_the_last_step_get_fresh_weights():
    fake = FakeSource(eval_every=3)
    source = AsyncRolloutSource(fake, max_staleness=2, total_steps=5)
    history = run_steps(source, range(5))
    # Window pushes at 2 (0 + k) and 5 (3 + k, also the last step); the eval at 3 pushes.
    assert fake.pushes == [2, 3, 5]
    assert source.evaluate() == {"eval/version": 5.0}
    # Batches 3 and 4 were queued after the push of version 2, none after the eval push.
    assert [c[:2] for c in fake.calls] == [(0, 0), (1, 0), (2, 0), (3, 2), (4, 2)]
    assert [m["rollout/staleness/max"] for m in history] == [0, 1, 2, 1, 2]


def test_eval_with_stale_engine_weights_is_refused():
    source = AsyncRolloutSource(FakeSource(), max_staleness=2, total_steps=5)
    source.collect_groups(0)
    source.sync_weights(None, 1)  # no push: the engine still holds version 0
    with pytest.raises(RuntimeError, match="version 0, not the trainer's 1"):
        source.evaluate()


def test_too_stale_batch_is_dropped_with_the_queue_behind_it_and_regenerated():
    fake = FakeSource()
    source = AsyncRolloutSource(fake, max_staleness=2, total_steps=6)
    source.collect_groups(0)  # queues 1, 2 with version 0
    source.sync_weights(None, 3)  # a version jump: 3 >= 0 + 2 pushes, queues 3..5 with v3
    groups, metrics = source.collect_groups(1)  # batch 1 (v0) is 3 versions behind
    assert metrics["rollout/stale_regenerated"] == 1.0
    assert metrics["rollout/stale_dropped"] == 5.0  # batches 1..5
    assert metrics["rollout/staleness/max"] == 0.0  # sampled again with version 3
    assert groups[0][0].rollout.prompt_index == 1  # the stream was rewound to before batch 1
    groups, metrics = source.collect_groups(2)  # queued behind it, with version 3
    assert groups[0][0].rollout.prompt_index == 2
    assert metrics["rollout/stale_dropped"] == 0.0
    # Generated: 0..2 with v0, 3..5 with v3 (all dropped), then 1, 2, ... again with v3.
    first = [(0, 0), (1, 0), (2, 0), (3, 3), (4, 3), (5, 3), (1, 3), (2, 3)]
    assert [c[:2] for c in fake.calls[:8]] == first


def _stopped_at_step_4(k: int) -> tuple[dict[str, Any], list[int]]:
    """A run of 8 steps stopped after step 3: its checkpoint state and the steps it queued."""
    fake = FakeSource()
    first = AsyncRolloutSource(fake, k, total_steps=8)
    run_steps(first, range(4))
    state = first.state_dict()  # waits for the queue: the stream is past the queued batches
    queued = [c[0] for c in fake.calls if c[0] >= 4]
    assert queued and fake.stream.position == 4 + len(queued)
    assert state["stream"] == {"position": 4}  # before the oldest untrained batch
    return state, queued


@pytest.mark.parametrize("k", [1, 2, 3])
def test_resume_trains_the_queued_batches_like_the_straight_run(k):
    straight_fake = FakeSource()
    straight = run_steps(AsyncRolloutSource(straight_fake, k, total_steps=8), range(8))
    state, queued = _stopped_at_step_4(k)
    assert [job["step"] for job in state[RANK_STATE]["jobs"]] == queued
    resumed_fake = FakeSource()
    resumed = AsyncRolloutSource(resumed_fake, k, total_steps=8)
    resumed.load_state_dict(state)
    resumed.sync_weights(None, 4)  # Trainer.resume: pushes only where the straight run did
    history = run_steps(resumed, range(4, 8))
    assert [c[0] for c in resumed_fake.calls if c[0] in queued] == []  # none generated again
    keys = ("prompt", "rollout/staleness/max", "rollout/pushed")
    assert [{k_: m[k_] for k_ in keys} for m in history] == [
        {k_: m[k_] for k_ in keys} for m in straight[4:]
    ]
    # version 4 was pushed before the checkpoint: the resumed run pushes what came after it
    assert resumed_fake.pushes == [v for v in straight_fake.pushes if v > 4]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_resume_without_the_queued_batches_regenerates_them(k):
    """An older checkpoint (or a failed generation in the queue) has no prefetched batches: the
    resumed run pushes the checkpoint's weights and generates them again, from the same rows."""
    straight = run_steps(AsyncRolloutSource(FakeSource(), k, total_steps=8), range(8))
    state, _ = _stopped_at_step_4(k)
    state = {key: value for key, value in state.items() if key != RANK_STATE}
    resumed_fake = FakeSource()
    resumed = AsyncRolloutSource(resumed_fake, k, total_steps=8)
    resumed.load_state_dict(state)
    resumed.sync_weights(None, 4)
    assert resumed_fake.pushes == [4]
    history = run_steps(resumed, range(4, 8))
    assert [m["prompt"] for m in history] == [m["prompt"] for m in straight[4:]]
    # The resumed run restarts the window at version 4: 0, then 1, ..., k.
    expected = [0.0] + [float((j - 1) % k + 1) for j in range(1, 4)]
    assert [m["rollout/staleness/max"] for m in history] == expected


def test_a_failed_generation_is_raised_and_its_prompts_are_generated_again():
    fake = FakeSource()
    generate = fake.collect_groups

    def broken(step: int, model: Any = None) -> tuple[list[list[Sample]], dict]:
        if step == 3:
            fake.stream.position += 1  # took its prompts, then failed
            raise RolloutServerError("server died")
        return generate(step, model)

    fake.collect_groups = broken
    source = AsyncRolloutSource(fake, max_staleness=2, total_steps=6)
    run_steps(source, range(3))  # the push of version 2 queued 3 and 4
    with pytest.raises(RolloutServerError, match="server died"):
        source.collect_groups(3)
    assert source.state_dict()["stream"] == {"position": 3}  # what the interrupted ckpt saves
    with pytest.raises(RolloutServerError, match="server died"):
        source.collect_groups(3)  # the failed batch stays at the head of the queue


def test_async_refuses_entropy_rewards_and_opo():
    with pytest.raises(ConfigError, match="token_entropy"):
        AsyncRolloutSource(FakeSource(needs_entropy=True), 1, 2)
    with pytest.raises(ConfigError, match="opo"):
        AsyncRolloutSource(FakeSource(estimator="opo"), 1, 2)


def test_server_and_staleness_config_checks():
    with pytest.raises(ConfigError, match=r"rollout\.engine=server needs rollout\.server_url"):
        load_config(None, ["rollout.engine=server"])
    with pytest.raises(ConfigError, match=r"rollout\.max_staleness must be >= 0"):
        load_config(None, ["rollout.max_staleness=-1"])
    with pytest.raises(ConfigError, match=r"rollout\.server_timeout_s must be > 0"):
        load_config(None, ["rollout.server_timeout_s=0"])
    cfg = load_config(
        None,
        ["rollout.engine=server", "rollout.server_url=http://a:8000, http://b:8001"],
    )
    from posttrain.rollout.vllm_server import parse_urls

    assert parse_urls(cfg.rollout.server_url) == ["http://a:8000", "http://b:8001"]
    assert load_config(None, []).rollout.max_staleness == 0
