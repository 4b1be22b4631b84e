"""Exact data accounting, the pure pieces: streams note the (epoch, row id) of every row they hand
out, and `data_ids.jsonl` is written one line per step, read past a torn last line, and cut back
to the resumed step."""

from __future__ import annotations

import json
import random

import pytest

from posttrain.data.pool import PromptPool
from posttrain.data.stream import RowStream
from posttrain.runtime.data_log import FILE, DataLog, Drawn, read_data_ids, record, truncate


def _epoch_orders(n: int, seed: int, epochs: int) -> list[tuple[int, int]]:
    """(epoch, id) of the first `epochs` epochs, by the documented rule: epoch e is
    range(n) shuffled with random.Random(seed + e)."""
    out = []
    for e in range(epochs):
        order = list(range(n))
        random.Random(seed + e).shuffle(order)
        out += [(e, i) for i in order]
    return out


def test_row_stream_notes_every_row_across_epochs():
    rows = [{"k": i} for i in range(5)]
    stream = RowStream(rows, seed=3)
    want = _epoch_orders(5, 3, 3)
    got, taken = [], []
    for n in (2, 4, 3, 1, 5):  # 15 rows: three epochs, two boundaries inside a take
        taken += stream.take(n)
        got += stream.take_drawn()
    assert got == want
    assert taken == [rows[i] for _, i in want]  # the id is the row's index
    assert stream.take_drawn() == []  # collected notes are forgotten


def test_row_stream_resume_draws_the_rest_exactly():
    stream = RowStream(list(range(7)), seed=0)
    stream.take(9)
    state = stream.state_dict()
    resumed = RowStream(list(range(7)), seed=0)
    resumed.take(3)  # notes of a position that the checkpoint does not hold are dropped
    resumed.load_state_dict(state)
    assert resumed.take_drawn() == []
    resumed.take(12)
    assert resumed.take_drawn() == _epoch_orders(7, 0, 3)[9:21]


def test_prompt_pool_notes_and_never_draws_a_removed_row():
    pool = PromptPool([{"i": i} for i in range(6)], seed=1, resample=True, min_size=2)
    first = pool.take_indices(6)
    assert pool.take_drawn() == [(0, i) for i in first]
    for i in (0, 3):
        pool.record(i, True)
    pool.take_indices(8)  # epoch 1 has 4 rows: 4 + 4 of epoch 2
    drawn = pool.take_drawn()
    order1 = [1, 2, 4, 5]
    random.Random(2).shuffle(order1)
    order2 = [1, 2, 4, 5]
    random.Random(3).shuffle(order2)
    assert drawn == [(1, i) for i in order1] + [(2, i) for i in order2]


def test_record_line_format():
    line = record(3, Drawn([4, 1, 2], [0, 0, 1]))
    assert line == {"step": 3, "epoch": 0, "ids": [4, 1, 2], "epochs": [0, 0, 1]}
    assert record(1, Drawn.of([(2, 5)], stage=1)) == {
        "step": 1,
        "epoch": 2,
        "ids": [5],
        "epochs": [2],
        "stage": 1,
    }


def test_data_log_appends_and_cuts_back_on_resume(tmp_path):
    log = DataLog(tmp_path, enabled=True)
    log.start(0)
    for step in range(1, 6):
        log.write(step, Drawn([step, step + 10], [0, 0]))
    assert [r["step"] for r in read_data_ids(tmp_path / FILE)] == [1, 2, 3, 4, 5]
    with (tmp_path / FILE).open("a") as fh:  # a kill in the middle of step 6's write
        fh.write('{"step": 6, "epoch": 0, "ids": [6')
    assert [r["step"] for r in read_data_ids(tmp_path / FILE)] == [1, 2, 3, 4, 5]
    resumed = DataLog(tmp_path, enabled=True)
    resumed.start(3)  # resumed from the checkpoint of step 3
    assert len(read_data_ids(tmp_path / FILE)) == 5  # nothing cut before a step is written
    resumed.write(4, Drawn([4, 14], [0, 0]))
    text = (tmp_path / FILE).read_text()
    assert text.endswith("\n") and text.count("\n") == 4
    assert [json.loads(x)["step"] for x in text.splitlines()] == [1, 2, 3, 4]


def test_data_log_other_ranks_and_unknown_positions_write_nothing(tmp_path):
    DataLog(tmp_path, enabled=False).write(1, Drawn([1], [0]))
    DataLog(tmp_path, enabled=True).write(1, None)
    assert not (tmp_path / FILE).exists()


def test_read_keeps_a_complete_last_line_and_rejects_damage_inside(tmp_path):
    path = tmp_path / FILE
    path.write_text('{"step": 1, "ids": [1]}\n{"step": 2, "ids": [2]}')  # no final newline
    assert [r["step"] for r in read_data_ids(path)] == [1, 2]
    truncate(path, 5)
    assert path.read_text() == '{"step": 1, "ids": [1]}\n{"step": 2, "ids": [2]}\n'
    path.write_text('{"step": 1, "ids": [1]}\n{"step": 2, "ids\n{"step": 3, "ids": [3]}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_data_ids(path)
    assert read_data_ids(tmp_path / "missing.jsonl") == []
