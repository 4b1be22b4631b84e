"""Deterministic synthetic image task for tiny vision-language models (`data.source: shapes`).

Each row holds one small RGB image of coloured squares on a black background:
``{"prompt": str, "images": [PIL.Image], "answer": str, "box": [x1, y1, x2, y2]}``. Three kinds
(`data.task.kind`):

- ``quadrant``: one red square lies wholly inside one quadrant of the image; the answer is the
  quadrant's number in reading order, ``1`` top-left, ``2`` top-right, ``3`` bottom-left, ``4``
  bottom-right (one decisive token for a character model, scored by ``exact_answer``), or with
  ``answer_style: word`` its name ``top-left``... (score it with a string reward, e.g.
  ``regex_match``).
- ``count``: 1 to ``max_count`` red squares; the answer is their number (one digit).
- ``box``: one red square anywhere; the answer is its box ``[x1, y1, x2, y2]`` in pixels.

Boxes are pixel corners with ``x2``/``y2`` one past the last pixel (PIL's crop box), so
``(x2 - x1) * (y2 - y1)`` is the square's pixel area. The ``box`` column holds the red square's box
(for ``count``: the box around all red squares). Every kind adds 0 to ``max_distractors`` squares of
other colours (blue, green, white). Squares never touch (one background pixel at least between
them), so the answer can be recomputed from the pixels.

Splits are disjoint by construction: which split a row belongs to is a hash of its red squares'
positions and sizes (not of the seed), so no held-out row has its red square(s) where any train
row has them, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

from posttrain.errors import ConfigError, did_you_mean

KINDS = ("quadrant", "count", "box")
SPLITS = ("train", "test")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
BACKGROUND = (0, 0, 0)
RED = (255, 0, 0)
DISTRACTOR_COLOURS = ((0, 0, 255), (0, 255, 0), (255, 255, 255))
PROMPTS = {
    "quadrant": "Red square quadrant (1-4)?",
    "quadrant_word": "Where is the red square?",
    "count": "How many red squares?",
    "box": "Box of the red square?",
}
DEFAULTS: dict[str, Any] = {
    "kind": "quadrant",
    "image_size": 32,
    "min_size": None,  # side of a square in pixels; None: image_size // 8
    "max_size": None,  # None: image_size // 4
    "max_distractors": 2,
    "max_count": 4,
    "answer_style": "digit",  # quadrant answers: "digit" (1-4, reading order) or "word"
    "test_fraction": 0.1,
}
ANSWER_STYLES = ("digit", "word")
_PLACE_TRIES = 200

Square = tuple[int, int, int]  # x, y (top-left pixel), side


def resolve_task(task: dict[str, Any] | None, where: str = "data.task") -> dict[str, Any]:
    """The task's options with defaults filled in, checked.

    Args:
        task: the `data.task` mapping (None or {} for all defaults).
        where: config path for messages.

    Raises:
        ConfigError: an unknown key or an invalid value (one line naming `<where>.<key>`).
    """
    opts = dict(DEFAULTS)
    for key, value in (task or {}).items():
        if key not in DEFAULTS:
            raise ConfigError(
                f"unknown config key '{where}.{key}' for source 'shapes'"
                f"{did_you_mean(str(key), list(DEFAULTS))}; valid keys: {', '.join(DEFAULTS)}"
            )
        opts[key] = value
    if opts["kind"] not in KINDS:
        raise ConfigError(f"{where}.kind={opts['kind']!r} is not valid; use one of {list(KINDS)}")
    if opts["answer_style"] not in ANSWER_STYLES:
        raise ConfigError(
            f"{where}.answer_style={opts['answer_style']!r} is not valid; use one of "
            f"{list(ANSWER_STYLES)}"
        )
    for key in ("image_size", "max_distractors", "max_count"):
        if not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < 0:
            raise ConfigError(f"{where}.{key}={opts[key]!r} is not valid; use an integer >= 0")
    size = opts["image_size"]
    if size < 16:
        raise ConfigError(f"{where}.image_size={size} is not valid; use an integer >= 16")
    opts["min_size"] = size // 8 if opts["min_size"] is None else opts["min_size"]
    opts["max_size"] = size // 4 if opts["max_size"] is None else opts["max_size"]
    lo, hi = opts["min_size"], opts["max_size"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not (
        2 <= lo <= hi <= size // 2 - 1
    ):
        raise ConfigError(
            f"{where}.min_size={lo!r}, max_size={hi!r}: use integers with 2 <= min_size <= "
            f"max_size <= image_size // 2 - 1 = {size // 2 - 1}"
        )
    if not 1 <= opts["max_count"] <= 9:
        raise ConfigError(f"{where}.max_count={opts['max_count']} is not valid; use 1 to 9")
    frac = opts["test_fraction"]
    if not isinstance(frac, int | float) or not 0.0 < frac < 1.0:
        raise ConfigError(f"{where}.test_fraction={frac!r} is not valid; use a value in (0, 1)")
    return opts


def scene_split(kind: str, image_size: int, targets: list[Square], test_fraction: float) -> str:
    """Which split a scene belongs to: a stable hash of its red squares, independent of any seed.

    Args:
        kind: task kind.
        image_size: image side in pixels.
        targets: the red squares ``(x, y, side)``.
        test_fraction: fraction of scenes assigned to ``"test"``.

    Returns:
        ``"train"`` or ``"test"``.
    """
    key = f"{kind}|{image_size}|" + ";".join(f"{x},{y},{s}" for x, y, s in sorted(targets))
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2.0**64 < test_fraction else "train"


def quadrant_of(square: Square, image_size: int) -> str:
    """The quadrant name of a square's centre (`QUADRANTS`)."""
    x, y, s = square
    half = image_size / 2
    return QUADRANTS[2 * int(y + s / 2 > half) + int(x + s / 2 > half)]


def box_text(box: list[int]) -> str:
    """A box as the answer string, e.g. ``"[3, 5, 11, 13]"``."""
    return "[" + ", ".join(str(int(v)) for v in box) + "]"


def _apart(a: Square, b: Square) -> bool:
    """True when two squares neither overlap nor touch (a background pixel at least between)."""
    ax, ay, asz = a
    bx, by, bsz = b
    return ax + asz < bx or bx + bsz < ax or ay + asz < by or by + bsz < ay


def _place(rng: random.Random, placed: list[Square], side: int, image_size: int) -> Square | None:
    """A random square of `side` apart from all of `placed`, or None after a few tries."""
    for _ in range(_PLACE_TRIES):
        sq = (rng.randint(0, image_size - side), rng.randint(0, image_size - side), side)
        if all(_apart(sq, other) for other in placed):
            return sq
    return None


def _single_targets(kind: str, opts: dict[str, Any]) -> list[Square]:
    """Every possible lone red square of a `quadrant` (inside one quadrant) or `box` scene."""
    size, half = opts["image_size"], opts["image_size"] // 2
    out = []
    for s in range(opts["min_size"], opts["max_size"] + 1):
        for y in range(size - s + 1):
            for x in range(size - s + 1):
                inside = (x + s <= half or x >= half) and (y + s <= half or y >= half)
                if kind == "box" or inside:
                    out.append((x, y, s))
    return out


def _target_stream(split: str, opts: dict[str, Any], rng: random.Random) -> Iterator[list[Square]]:
    """Distinct red-square sets of one split, in a seeded random order."""
    kind, size, frac = opts["kind"], opts["image_size"], opts["test_fraction"]
    if kind != "count":
        pool = [
            t for t in _single_targets(kind, opts) if scene_split(kind, size, [t], frac) == split
        ]
        rng.shuffle(pool)
        yield from ([t] for t in pool)
        return
    seen: set[tuple[Square, ...]] = set()
    misses = 0
    while misses < 10_000:  # ends only when the split's sets are (nearly) exhausted
        n = rng.randint(1, opts["max_count"])
        targets: list[Square] = []
        for _ in range(n):
            sq = _place(rng, targets, rng.randint(opts["min_size"], opts["max_size"]), size)
            if sq is None:
                break
            targets.append(sq)
        key = tuple(sorted(targets))
        if len(targets) < n or key in seen or scene_split(kind, size, targets, frac) != split:
            misses += 1
            continue
        misses = 0
        seen.add(key)
        yield targets


def render(image_size: int, squares: list[tuple[Square, tuple[int, int, int]]]) -> Any:
    """An RGB PIL image of `(square, colour)` pairs on the black background."""
    from PIL import Image

    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    for (x, y, s), colour in squares:
        img.paste(colour, (x, y, x + s, y + s))
    return img


def _row(targets: list[Square], opts: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    kind, size = opts["kind"], opts["image_size"]
    placed = list(targets)
    squares = [(t, RED) for t in targets]
    for _ in range(rng.randint(0, opts["max_distractors"])):
        sq = _place(rng, placed, rng.randint(opts["min_size"], opts["max_size"]), size)
        if sq is not None:
            placed.append(sq)
            squares.append((sq, rng.choice(DISTRACTOR_COLOURS)))
    box = [
        min(x for x, _, _ in targets),
        min(y for _, y, _ in targets),
        max(x + s for x, _, s in targets),
        max(y + s for _, y, s in targets),
    ]
    prompt = PROMPTS[kind]
    if kind == "quadrant":
        answer = quadrant_of(targets[0], size)
        if opts["answer_style"] == "digit":
            answer = str(QUADRANTS.index(answer) + 1)
        else:
            prompt = PROMPTS["quadrant_word"]
    elif kind == "count":
        answer = str(len(targets))
    else:
        answer = box_text(box)
    image = render(size, squares)
    return {"prompt": prompt, "images": [image], "answer": answer, "box": box}


def make_split(split: str, n: int, seed: int, **task: Any) -> list[dict[str, Any]]:
    """Draw ``n`` rows of one split of the shapes task.

    The same arguments always give the same rows (pixel for pixel), and a smaller ``n`` gives a
    prefix of a larger one.

    Args:
        split: ``"train"`` or ``"test"``.
        n: number of rows (distinct red-square placements).
        seed: sampling seed (does not change which split a placement belongs to).
        **task: `data.task` options (`DEFAULTS`): kind, image_size, min_size, max_size,
            max_distractors, max_count, answer_style, test_fraction.

    Returns:
        ``n`` rows ``{"prompt", "images": [PIL.Image], "answer", "box"}``.

    Raises:
        ConfigError: invalid options, or ``n`` larger than the split's distinct placements.
    """
    opts = resolve_task(task)
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not valid for shapes; use one of {SPLITS}")
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"n={n!r} is not valid for the shapes task; use an integer >= 0")
    rng = random.Random(f"shapes:{opts['kind']}:{split}:{seed}")
    rows = []
    for targets in _target_stream(split, opts, rng):
        if len(rows) == n:
            break
        rows.append(_row(targets, opts, rng))
    if len(rows) < n:
        raise ConfigError(
            f"n={n} exceeds the {len(rows)} distinct {split} scenes of shapes kind "
            f"{opts['kind']!r} at image_size={opts['image_size']}; lower n or raise image_size"
        )
    return rows


def sft_completion(row: dict[str, Any]) -> str:
    """The target completion for supervised fine-tuning: the answer string."""
    return str(row["answer"])
