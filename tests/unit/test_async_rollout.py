"""Async rollouts with bounded staleness (a fake source) and the server/async config checks."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from posttrain.algorithms.async_rollout import AsyncRolloutSource
from posttrain.algorithms.rollout_batch import Sample
from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.rollout.engine import Rollout


class FakeStream:
    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


class FakeSource:
    """Each batch takes the next prompt position and stamps the current weight version."""

    def __init__(self, estimator: str = "grpo", needs_entropy: bool = False) -> None:
        self.cfg = SimpleNamespace(advantage=SimpleNamespace(estimator=estimator))
        self.needs_entropy = needs_entropy
        self.stream = FakeStream()
        self.weight_version = 0
        self.calls: list[tuple[int, int, str]] = []  # (step, version, thread name)
        self.generating = threading.Event()

    def collect_groups(self, step: int, model: Any = None) -> tuple[list[list[Sample]], dict]:
        self.generating.set()
        time.sleep(0.05)
        position = self.stream.position
        self.stream.position += 1
        self.calls.append((step, self.weight_version, threading.current_thread().name))
        rollout = Rollout(position, [1], [2], [-0.5], "x", "stop", self.weight_version)
        self.generating.clear()
        return [[Sample(rollout, 1.0, True)]], {"step": float(step)}

    def sync_weights(self, model: Any, version: int) -> dict[str, float]:
        assert not self.generating.is_set(), "a weight push overlapped a generation"
        self.weight_version = version
        return {"weight_version": float(version)}

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "weight_version": self.weight_version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.weight_version = state["weight_version"]


def test_prefetch_overlaps_and_staleness_is_bounded():
    fake = FakeSource()
    source = AsyncRolloutSource(fake, max_staleness=1, total_steps=4)
    staleness = []
    for step in range(4):
        groups, metrics = source.collect_groups(step)
        assert metrics["step"] == step
        assert groups[0][0].rollout.prompt_index == step  # prompts in order, none skipped
        staleness.append(metrics["rollout/staleness/max"])
        assert metrics["rollout/stale_regenerated"] == 0.0
        source.sync_weights(None, step + 1)
    assert staleness == [0.0, 1.0, 1.0, 1.0]
    # Step 0 is generated in the caller's thread, later steps in the background with the
    # weights of the step before; nothing is prefetched past the last step.
    assert [c[:2] for c in fake.calls] == [(0, 0), (1, 0), (2, 1), (3, 2)]
    assert fake.calls[0][2] == threading.current_thread().name
    assert all(c[2].startswith("rollout-prefetch") for c in fake.calls[1:])


def test_too_stale_batch_is_regenerated_with_the_same_prompts():
    fake = FakeSource()
    source = AsyncRolloutSource(fake, max_staleness=1, total_steps=3)
    source.collect_groups(0)  # prefetches step 1 with version 0
    source.sync_weights(None, 1)
    fake.weight_version = 2  # e.g. two pushes: the prefetched batch is 2 versions behind
    groups, metrics = source.collect_groups(1)
    assert metrics["rollout/stale_regenerated"] == 1.0
    assert metrics["rollout/staleness/max"] == 0.0
    assert groups[0][0].rollout.prompt_index == 1  # the stream was rewound to before the prefetch


def test_checkpoint_state_is_from_before_the_prefetch():
    fake = FakeSource()
    source = AsyncRolloutSource(fake, max_staleness=2, total_steps=3)
    source.collect_groups(0)
    state = source.state_dict()  # waits for the prefetch of step 1
    assert fake.stream.position == 2
    assert state["stream"] == {"position": 1}
    source.load_state_dict(state)
    groups, _ = source.collect_groups(1)
    assert groups[0][0].rollout.prompt_index == 1


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
