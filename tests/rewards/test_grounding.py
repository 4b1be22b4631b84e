"""The grounding reward `box_iou`: hand-computed IoUs, parsing, threshold, the gold column by
another name, and start-up validation."""

from __future__ import annotations

import itertools

import pytest

import rewards
from posttrain.data import shapes
from rewards.grounding import box_iou, iou, parse_box
from rewards.registry import RewardSpec
from rewards.startup import validate_rewards


def _scores(completions, golds, **kwargs):
    return list(box_iou(["p"] * len(completions), completions, box=golds, **kwargs))


def test_hand_values():
    gold = [0, 0, 10, 10]
    got = _scores(
        [
            "[0, 0, 10, 10]",  # identical
            "[20, 20, 30, 30]",  # disjoint
            "[10, 0, 20, 10]",  # touching edge: zero-area intersection
            "[5, 0, 15, 10]",  # half overlap: 50 / (100 + 100 - 50)
            "[0, 0, 5, 5]",  # inside: 25 / 100
            "[-5, -5, 5, 5]",  # corner: 25 / (100 + 100 - 25)
        ],
        [gold] * 6,
    )
    assert got == pytest.approx([1.0, 0.0, 0.0, 50 / 150, 25 / 100, 25 / 175])


def test_parsing_last_box_floats_and_spaces():
    assert parse_box("first [1, 1, 2, 2] then [ 0.5 ,1.25,  3 , 4.0 ]") == (0.5, 1.25, 3.0, 4.0)
    assert parse_box("[0,0,.5,+1]") == (0.0, 0.0, 0.5, 1.0)
    # malformed, unordered, three numbers, text: no box
    for text in ["no box here", "[1, 2, 3]", "[3, 0, 1, 4]", "[0, 4, 2, 4]", "[a, b, c, d]", ""]:
        assert parse_box(text) is None, text
    gold = [[0, 0, 10, 10]] * 4
    assert _scores(["", "[1, 2, 3]", "box: (0, 0, 10, 10)", "[10, 0, 0, 10]"], gold) == [0.0] * 4
    # a string gold box and float coordinates
    assert _scores(["[0.0, 0.0, 0.5, 1.0]"], ["[0, 0, 1, 1]"]) == pytest.approx([0.5])


def test_threshold_and_box_column_kwarg():
    gold = [[0, 0, 10, 10]] * 3
    comps = ["[0, 0, 10, 10]", "[5, 0, 15, 10]", "[0, 0, 10, 5]"]  # IoU 1, 1/3, 1/2
    assert _scores(comps, gold, threshold=0.5) == [1.0, 0.0, 1.0]
    out = box_iou(["p"] * 3, comps, box_column="bbox", bbox=gold)
    assert list(out) == pytest.approx([1.0, 1 / 3, 0.5])
    assert out.metrics["parsed"] == 1.0 and out.metrics["iou_mean"] == pytest.approx(11 / 18)
    with pytest.raises(ValueError, match="threshold"):
        _scores(comps, gold, threshold=1.5)


def test_invalid_gold_is_none_with_reason():
    out = box_iou(["p"] * 3, ["[0, 0, 1, 1]"] * 3, box=[None, [0, 0, 1], [0, 0, 1, 1]])
    assert list(out) == [None, None, 1.0]
    assert out.reasons[:2] == ["no_gold_box", "no_gold_box"]


def _pixels(box: list[int]) -> set[tuple[int, int]]:
    return {(x, y) for x in range(box[0], box[2]) for y in range(box[1], box[3])}


def test_iou_matches_pixel_counts_and_is_symmetric():
    rows = shapes.make_split("train", 10, 0, kind="box")
    overlapping = 0
    for row in rows:
        gold = row["box"]
        for dx, dy, grow in itertools.product((-3, 0, 2), (-1, 0, 4), (0, 3)):
            other = [gold[0] + dx, gold[1] + dy, gold[2] + dx + grow, gold[3] + dy]
            pa, pb = _pixels(gold), _pixels(other)
            expected = len(pa & pb) / len(pa | pb)
            overlapping += 0 < expected < 1
            a, b = tuple(map(float, gold)), tuple(map(float, other))
            assert iou(a, b) == pytest.approx(expected) == pytest.approx(iou(b, a))
    assert overlapping > 100
    # the shapes task's own answers score 1 against its box column
    assert _scores([r["answer"] for r in rows], [r["box"] for r in rows]) == [1.0] * 10


def test_registry_and_startup_validation():
    assert "box_iou" in rewards.available()
    assert rewards.required_columns("box_iou") == ("box",)
    assert rewards.required_columns("box_iou", {"box_column": "bbox"}) == ("bbox",)
    validate_rewards([RewardSpec("box_iou")], {"answer": [], "box": []})
    validate_rewards([RewardSpec("box_iou", kwargs={"box_column": "bbox"})], {"bbox": []})
    with pytest.raises(rewards.RewardConfigError, match="needs 'bbox'"):
        validate_rewards([RewardSpec("box_iou", kwargs={"box_column": "bbox"})], {"box": []})
    with pytest.raises(rewards.RewardConfigError, match="has no option 'treshold'"):
        validate_rewards([RewardSpec("box_iou", kwargs={"treshold": 0.5})], {"box": []})
    with pytest.raises(rewards.RewardConfigError, match="threshold='high' must be"):
        validate_rewards([RewardSpec("box_iou", kwargs={"threshold": "high"})], {"box": []})
