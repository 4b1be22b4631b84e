"""SRPO history resampling (prompt pool) and curriculum stages: hand-computed pool updates."""

from __future__ import annotations

import json
import random

import pytest

from posttrain.config import load_config
from posttrain.data.curriculum import PromptSchedule, load_stage_rows, stage_at, stage_ends
from posttrain.data.pool import PromptPool, group_all_correct, update_pool
from posttrain.data.stream import RowStream
from posttrain.errors import ConfigError


def _rows(n: int, tag: str = "r") -> list[dict]:
    return [{"prompt": f"{tag}{i}", "answer": str(i)} for i in range(n)]


def test_group_all_correct():
    assert group_all_correct([1.0, 1.0, 1.0])
    assert not group_all_correct([1.0, 0.0, 1.0])
    assert not group_all_correct([1.0, None])  # could not judge = not correct
    assert not group_all_correct([])
    assert group_all_correct([1.5, 1.0])  # >= 1 is correct, as in evaluation


def test_update_pool_hand_values():
    assert update_pool([0, 1, 2, 3, 4, 5], {1, 3}) == ([0, 2, 4, 5], 2)
    assert update_pool([5, 2, 7], {2, 9}) == ([5, 7], 1)  # 9 is not in the pool; order kept
    assert update_pool([0, 1, 2], set()) == ([0, 1, 2], 0)
    # Removing all would empty the pool: nothing is removed.
    assert update_pool([0, 1, 2], {0, 1, 2}) == ([0, 1, 2], 0)
    # min_size: 4 - 2 = 2 < 3 -> nothing removed; 4 - 1 = 3 >= 3 -> removed.
    assert update_pool([0, 1, 2, 3], {0, 1}, min_size=3) == ([0, 1, 2, 3], 0)
    assert update_pool([0, 1, 2, 3], {0}, min_size=3) == ([1, 2, 3], 1)


def test_full_pool_matches_rowstream_order():
    rows = _rows(7)
    a, b = PromptPool(rows, seed=3), RowStream(rows, seed=3)
    assert [r["prompt"] for r in a.take(25)] == [r["prompt"] for r in b.take(25)]


def test_resampling_removes_all_correct_prompts_at_epoch_end():
    pool = PromptPool(_rows(6), seed=0, resample=True)
    first = pool.take_indices(6)
    assert sorted(first) == list(range(6)) and pool.epoch == 0
    for i in first:
        pool.record(i, all_correct=i in (1, 4))
    pool.record(4, all_correct=False)  # the latest outcome wins: 4 stays
    nxt = pool.take_indices(1)  # crosses into epoch 1
    assert pool.epoch == 1 and pool.pool == [0, 2, 3, 4, 5]
    order = [0, 2, 3, 4, 5]
    random.Random(0 + 1).shuffle(order)
    assert nxt == order[:1]
    assert pool.take_indices(4) == order[1:]
    assert pool.metrics() == {
        "data/pool_size": 5.0,
        "data/epoch": 1.0,
        "data/pool_removed_total": 1.0,
    }


def test_straddling_batch_counts_at_next_boundary():
    pool = PromptPool(_rows(4), seed=2, resample=True)
    for i in pool.take_indices(3):
        pool.record(i, all_correct=False)
    straddle = pool.take_indices(2)  # the last prompt of epoch 0 + the first of epoch 1
    assert (
        straddle == [0, 3] and pool.epoch == 1 and pool.pool == [0, 1, 2, 3]
    )  # not recorded yet at the boundary
    pool.record(straddle[0], all_correct=True)
    pool.record(straddle[1], all_correct=False)
    pool.take_indices(3)  # the rest of epoch 1
    assert pool.epoch == 1 and pool.pool == [0, 1, 2, 3]
    pool.take_indices(1)  # epoch 2: the straddling solved prompt leaves now
    assert pool.epoch == 2 and pool.pool == [i for i in range(4) if i != straddle[0]]
    assert pool.removed_total == 1


def test_all_solved_keeps_pool_and_clears_record():
    pool = PromptPool(_rows(3), seed=0, resample=True)
    for i in pool.take_indices(3):
        pool.record(i, all_correct=True)
    pool.take_indices(1)  # removing all would empty the pool: nothing removed
    assert pool.pool == [0, 1, 2] and pool.removed_total == 0 and not pool.solved


def test_min_size_keeps_pool():
    pool = PromptPool(_rows(3), seed=0, resample=True, min_size=2)
    for i in pool.take_indices(3):
        pool.record(i, all_correct=i != 0)  # removing 1 and 2 would leave 1 < 2 prompts
    pool.take_indices(1)
    assert pool.pool == [0, 1, 2]


def test_resampling_off_never_removes():
    pool = PromptPool(_rows(3), seed=0)
    for i in pool.take_indices(3):
        pool.record(i, True)
    pool.take_indices(3)
    assert pool.pool == [0, 1, 2] and pool.epoch == 1


def _drive(pool: PromptPool, steps: int) -> list[int]:
    """Take 4 prompts per step; prompts with an even index are 'solved'."""
    seen = []
    for _ in range(steps):
        idx = pool.take_indices(4)
        for i in idx:
            pool.record(i, i % 2 == 0)
        seen += idx
    return seen


def test_state_round_trip_gives_same_next_prompts():
    a = PromptPool(_rows(10), seed=5, resample=True)
    _drive(a, 4)  # mid-epoch 1, with a shrunken pool and pending outcomes
    assert a.epoch == 1 and len(a.pool) < 10 and a.solved
    state = json.loads(json.dumps(a.state_dict()))
    b = PromptPool(_rows(10), seed=5, resample=True)
    b.load_state_dict(state)
    assert _drive(a, 6) == _drive(b, 6)
    assert a.state_dict() == b.state_dict()
    # A RowStream state (older checkpoints) loads as the full pool.
    c = PromptPool(_rows(10), seed=5)
    c.load_state_dict({"epoch": 2, "pos": 3})
    s = RowStream(_rows(10), seed=5)
    s.load_state_dict({"epoch": 2, "pos": 3})
    assert c.take(12) == s.take(12)


def test_stage_ends_and_stage_at():
    assert stage_ends([3, 5]) == [3, 8]
    ends = [3, 8]
    assert [stage_at(s, ends) for s in range(11)] == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert stage_at(0, [0]) == 0


def test_schedule_switches_stage_and_resumes():
    sched = PromptSchedule([_rows(4, "a"), _rows(6, "b")], [2, 3], seed=0, resample=True)
    seen = []
    for step in range(4):
        sched.set_step(step)
        idx = sched.take_indices(3)
        sched.record(idx, [1.0] * 3 * 2)  # 3 groups of 2 samples, all correct
        seen.append((sched.metrics()["data/stage"], sched.rows[idx[0]]["prompt"][0]))
    assert seen == [(1.0, "a"), (1.0, "a"), (2.0, "b"), (2.0, "b")]
    m = sched.metrics()
    assert m["data/pool_size"] == 6.0 and m["data/epoch"] == 0.0  # the next take starts epoch 1
    state = json.loads(json.dumps(sched.state_dict()))
    other = PromptSchedule([_rows(4, "a"), _rows(6, "b")], [2, 3], seed=0, resample=True)
    other.load_state_dict(state)
    for s in (sched, other):
        s.set_step(4)
    assert sched.take_indices(5) == other.take_indices(5)
    with pytest.raises(ConfigError, match="2 prompt pools"):
        PromptSchedule([_rows(3)], [], seed=0).load_state_dict(state)


def test_schedule_logs_removed_this_step():
    sched = PromptSchedule([_rows(4)], [], seed=0, resample=True)
    sched.set_step(0)
    idx = sched.take_indices(4)
    sched.record(idx, [1.0 if i == idx[0] else 0.0 for i in idx for _ in range(2)])
    assert sched.metrics()["data/pool_removed"] == 0.0 and "data/stage" not in sched.metrics()
    sched.set_step(1)
    sched.take_indices(1)
    assert sched.metrics()["data/pool_removed"] == 1.0
    assert sched.metrics()["data/pool_size"] == 3.0


STAGES = "data.stages=[{task: {max_operand: 9}, steps: 2, train_size: 20}, {steps: 3}]"


def test_stage_config_validation():
    cfg = load_config(None, [STAGES, "train.steps=5", "data.train_size=30"])
    assert [s.steps for s in cfg.data.stages] == [2, 3]
    rows = load_stage_rows(cfg)
    assert [len(r) for r in rows] == [20, 30]
    assert all(int(r["prompt"].split("+")[0].split("-")[0]) <= 9 for r in rows[0])
    with pytest.raises(ConfigError, match=r"sum to 5, more than train.steps=4"):
        load_config(None, [STAGES, "train.steps=4"])
    with pytest.raises(ConfigError, match=r"data\.stages\[0\]\.step.*did you mean 'steps'"):
        load_config(None, ["data.stages=[{step: 2}]"])
    with pytest.raises(ConfigError, match=r"data\.stages\[0\]\.task\.max_operan.*'max_operand'"):
        load_config(None, ["data.stages=[{task: {max_operan: 9}, steps: 1}]"])
    with pytest.raises(ConfigError, match=r"data\.stages\[0\]\.steps must be >= 1"):
        load_config(None, ["data.stages=[{steps: 0}]"])


def test_stage_source_must_load(tmp_path):
    missing = tmp_path / "nope.jsonl"
    cfg = load_config(None, [f"data.stages=[{{source: {missing}, steps: 1}}]"])
    with pytest.raises(ConfigError, match=r"data\.stages\[0\]: data file .*nope\.jsonl"):
        load_stage_rows(cfg)
    too_many = load_config(None, ["data.stages=[{task: {max_operand: 3}, steps: 1}]"])
    with pytest.raises(ConfigError, match=r"data\.stages\[0\]: n=4000 exceeds"):
        load_stage_rows(too_many)


def test_history_resampling_needs_correctness_reward():
    load_config(None, ["rollout.history_resampling=true"])  # exact_answer is the default reward
    with pytest.raises(ConfigError, match=r"history_resampling.*eval\.reward='exact_answer'"):
        load_config(
            None,
            ["rollout.history_resampling=true", "rewards=[{name: format_number}]"],
        )
