"""`checkpoint.RANK_STATE`: trainer-state entries that each rank saves in its own torch file."""

from __future__ import annotations

import torch

from posttrain.runtime.checkpoint import RANK_STATE, _merge_rank_state, split_rank_state


def test_rank_state_entries_leave_the_json_state_and_come_back_at_any_depth():
    samples = [torch.arange(3), {"ids": [1, 2]}]
    state = {
        "step": 4,
        "algorithm": {"stream": {"pos": 8}, RANK_STATE: {"jobs": samples}},
        RANK_STATE: 7,
    }
    kept, per_rank = split_rank_state(state)
    assert kept == {"step": 4, "algorithm": {"stream": {"pos": 8}}}
    assert set(per_rank) == {(RANK_STATE,), ("algorithm", RANK_STATE)}
    assert RANK_STATE in state["algorithm"]  # the caller's state is not changed
    _merge_rank_state(kept, per_rank)
    assert kept[RANK_STATE] == 7
    assert kept["algorithm"][RANK_STATE]["jobs"] is samples


def test_a_state_without_rank_entries_saves_none():
    state = {"step": 1, "algorithm": {"stream": {"pos": 0, "pools": [{"epoch": 0}]}}}
    kept, per_rank = split_rank_state(state)
    assert kept == state and per_rank == {}
