"""The synthetic image task (`data.source: shapes`): determinism, answers recomputed from the drawn
pixels, disjoint splits, the data-source wiring and its config errors."""

from __future__ import annotations

import pytest

from posttrain.config import load_config
from posttrain.data import shapes
from posttrain.data.loading import load_rows
from posttrain.data.splits import load_train_eval_rows
from posttrain.errors import ConfigError

RED = (255, 0, 0)


def red_boxes(image) -> list[list[int]]:
    """Boxes [x1, y1, x2, y2] (x2/y2 exclusive) of the 4-connected red components, by flood fill."""
    width, height = image.size
    px = image.load()
    seen: set[tuple[int, int]] = set()
    boxes = []
    for y in range(height):
        for x in range(width):
            if (x, y) in seen or px[x, y] != RED:
                continue
            stack, comp = [(x, y)], []
            seen.add((x, y))
            while stack:
                cx, cy = stack.pop()
                comp.append((cx, cy))
                for nx, ny in ((cx + 1, cy), (cx - 1, cy), (cx, cy + 1), (cx, cy - 1)):
                    inside = 0 <= nx < width and 0 <= ny < height
                    if inside and (nx, ny) not in seen and px[nx, ny] == RED:
                        seen.add((nx, ny))
                        stack.append((nx, ny))
            xs, ys = [p[0] for p in comp], [p[1] for p in comp]
            box = [min(xs), min(ys), max(xs) + 1, max(ys) + 1]
            assert len(comp) == (box[2] - box[0]) * (box[3] - box[1])  # a filled square
            boxes.append(box)
    return boxes


def _quadrant(box: list[int], size: int) -> str:
    x1, y1, x2, y2 = box
    half = size // 2
    assert (x2 <= half or x1 >= half) and (y2 <= half or y1 >= half)  # wholly in one quadrant
    return ("top" if y2 <= half else "bottom") + "-" + ("left" if x2 <= half else "right")


@pytest.mark.parametrize("kind", shapes.KINDS)
def test_deterministic_and_prefix(kind):
    a = shapes.make_split("train", 40, seed=3, kind=kind)
    b = shapes.make_split("train", 40, seed=3, kind=kind)
    prefix = shapes.make_split("train", 15, seed=3, kind=kind)
    other = shapes.make_split("train", 40, seed=4, kind=kind)
    pixels = [r["images"][0].tobytes() for r in a]
    assert pixels == [r["images"][0].tobytes() for r in b]
    assert [(r["answer"], r["box"]) for r in a] == [(r["answer"], r["box"]) for r in b]
    assert pixels[:15] == [r["images"][0].tobytes() for r in prefix]
    assert pixels != [r["images"][0].tobytes() for r in other]


@pytest.mark.parametrize("kind", [*shapes.KINDS, "quadrant_word"])
@pytest.mark.parametrize("image_size", [32, 48])
def test_answers_recomputed_from_pixels(kind, image_size):
    words = kind == "quadrant_word"
    task = {"kind": "quadrant", "answer_style": "word"} if words else {"kind": kind}
    rows = shapes.make_split("train", 150, seed=1, image_size=image_size, **task)
    kind = task["kind"]
    for row in rows:
        (image,) = row["images"]
        assert image.mode == "RGB" and image.size == (image_size, image_size)
        assert row["prompt"] == shapes.PROMPTS["quadrant_word" if words else kind]
        boxes = red_boxes(image)
        enclosing = [
            min(b[0] for b in boxes),
            min(b[1] for b in boxes),
            max(b[2] for b in boxes),
            max(b[3] for b in boxes),
        ]
        assert row["box"] == enclosing
        if kind == "count":
            assert row["answer"] == str(len(boxes))
        else:
            assert len(boxes) == 1
        if kind == "quadrant":
            name = _quadrant(boxes[0], image_size)
            order = ["top-left", "top-right", "bottom-left", "bottom-right"]
            assert row["answer"] == (name if words else str(order.index(name) + 1))
        if kind == "box":
            x1, y1, x2, y2 = boxes[0]
            assert row["answer"] == f"[{x1}, {y1}, {x2}, {y2}]"
    answers = {r["answer"] for r in rows}
    if kind == "quadrant":
        assert answers == (set(shapes.QUADRANTS) if words else {"1", "2", "3", "4"})
    if kind == "count":
        assert answers == {"1", "2", "3", "4"}


@pytest.mark.parametrize("kind", shapes.KINDS)
def test_splits_disjoint(kind):
    def placements(rows):
        return {tuple(map(tuple, sorted(red_boxes(r["images"][0])))) for r in rows}

    train = set()
    for seed in (0, 1):
        train |= placements(shapes.make_split("train", 200, seed=seed, kind=kind))
    test = placements(shapes.make_split("test", 150, seed=0, kind=kind))
    assert len(test) == 150  # rows of a split are distinct placements
    assert not train & test


def test_distractors_never_red_and_apart():
    rows = shapes.make_split("train", 100, seed=0, kind="box", max_distractors=3)
    colours = set()
    for row in rows:
        colours |= {c for _, c in row["images"][0].getcolors()}
    assert colours <= {shapes.BACKGROUND, RED, *shapes.DISTRACTOR_COLOURS}
    assert len(colours) == 5  # some rows carry every distractor colour
    plain = shapes.make_split("train", 30, seed=0, kind="box", max_distractors=0)
    for row in plain:
        assert {c for _, c in row["images"][0].getcolors()} == {shapes.BACKGROUND, RED}


def test_load_rows_source_and_config_wiring():
    rows = load_rows("shapes", split="test", n=5, seed=2, task_kwargs={"kind": "count"})
    assert [r["answer"] for r in rows] == [
        r["answer"] for r in shapes.make_split("test", 5, seed=2, kind="count")
    ]
    cfg = load_config(
        None,
        [
            "data.source=shapes",
            "data.task={kind: box, image_size: 40}",
            "data.train_size=12",
            "data.eval_size=7",
        ],
    )
    train, held = load_train_eval_rows(cfg)
    assert len(train) == 12 and len(held) == 7
    assert all(r["images"][0].size == (40, 40) and r["answer"].startswith("[") for r in train)


@pytest.mark.parametrize(
    ("task", "fragment"),
    [
        ({"knd": "box"}, "data.task.knd.*did you mean 'kind'"),
        ({"kind": "circle"}, r"data.task.kind='circle'.*quadrant"),
        ({"image_size": 8}, r"data.task.image_size=8"),
        ({"min_size": 9, "max_size": 4}, r"min_size=9, max_size=4"),
        ({"max_count": 12}, r"data.task.max_count=12"),
        ({"answer_style": "letter"}, r"data.task.answer_style='letter'.*digit"),
    ],
)
def test_bad_task_is_one_config_error(task, fragment):
    with pytest.raises(ConfigError, match=fragment):
        shapes.make_split("train", 3, 0, **task)
    items = ", ".join(f"{k}: {v}" for k, v in task.items())
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, ["data.source=shapes", f"data.task={{{items}}}"])


def test_too_many_rows_names_the_capacity():
    with pytest.raises(ConfigError, match=r"n=5000 exceeds the \d+ distinct test scenes"):
        shapes.make_split("test", 5000, 0, kind="quadrant")
    with pytest.raises(ConfigError, match=r"data\.train_size is required for source 'shapes'"):
        load_rows("shapes", n=None, n_name="data.train_size")


@pytest.mark.parametrize("kind", ["quadrant", "count"])
def test_exact_answer_scores_digit_answers(kind):
    from rewards.math import exact_answer

    rows = shapes.make_split("train", 20, 0, kind=kind)
    answers = [r["answer"] for r in rows]
    wrong = [str(int(a) % 4 + 1) for a in answers]  # answers are 1-4: another digit
    assert exact_answer([""] * 20, answers, answer=answers) == [1.0] * 20
    assert exact_answer([""] * 20, wrong, answer=answers) == [0.0] * 20
