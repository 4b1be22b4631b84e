"""Images in prompt rows (data/images.py): every cell form decoded to the same RGB pixels, through
`load_rows` from jsonl (paths) and parquet (bytes, datasets.Image), and one ConfigError naming the
row and the image for each bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from posttrain.data.images import image_messages, load_images
from posttrain.data.loading import load_rows
from posttrain.errors import ConfigError

OPTS = {"column": "images", "max_images": 4, "max_pixels": 4096}


def _picture(seed: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> Image.Image:
    """A small image whose every pixel differs by seed and position."""
    img = Image.new("RGB", size)
    img.putdata(
        [
            ((x * 20 + seed) % 256, (y * 25) % 256, (seed * 40) % 256)
            for y in range(size[1])
            for x in range(size[0])
        ]
    )
    return img.convert(mode)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_image_messages():
    assert image_messages("Where?", 2) == [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Where?"}],
        }
    ]
    assert image_messages("Hi", 0, system_prompt="Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]


def test_every_cell_form_gives_the_same_rgb_pixels(tmp_path):
    rgba = _picture(1, mode="RGBA")
    (tmp_path / "a.png").write_bytes(_png(rgba))
    expected = rgba.convert("RGB").tobytes()
    cells = [
        "a.png",
        str(tmp_path / "a.png"),
        _png(rgba),
        {"bytes": _png(rgba), "path": None},
        {"bytes": None, "path": "a.png"},
        rgba,
        [_png(rgba)],
    ]
    rows = [{"prompt": "p", "images": c} for c in cells] + [{"prompt": "none", "images": None}]
    out = load_images(rows, source="mem", base_dir=tmp_path, **OPTS)
    for row in out[:-1]:
        assert len(row["images"]) == 1
        (img,) = row["images"]
        assert img.mode == "RGB" and img.size == (12, 10) and img.tobytes() == expected
    assert out[-1]["images"] == []


def test_jsonl_paths_relative_to_the_data_file(tmp_path):
    pics = [_picture(i) for i in range(3)]
    (tmp_path / "img").mkdir()
    for i, p in enumerate(pics):
        p.convert("L" if i == 2 else "RGB").save(tmp_path / "img" / f"{i}.png")
    data = _write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"prompt": "one", "images": ["img/0.png"], "answer": "a"},
            {"prompt": "two", "images": ["img/1.png", "img/2.png"], "answer": "b"},
            {"prompt": "lone", "images": "img/1.png", "answer": "c"},
        ],
    )
    rows = load_rows(str(data), image_options=OPTS)
    assert [len(r["images"]) for r in rows] == [1, 2, 1]
    assert rows[0]["images"][0].tobytes() == pics[0].tobytes()
    assert rows[1]["images"][1].tobytes() == pics[2].convert("L").convert("RGB").tobytes()
    assert rows[2]["images"][0].tobytes() == pics[1].tobytes()
    raw = load_rows(str(data))  # no image options: cells as loaded
    assert raw[0]["images"] == ["img/0.png"]


def test_parquet_bytes_and_datasets_image(tmp_path):
    import datasets

    pics = [_picture(i, size=(8, 8 + i)) for i in range(4)]
    datasets.Dataset.from_dict(
        {"prompt": ["a", "b", "c", "d"], "images": [[_png(p)] for p in pics]}
    ).to_parquet(str(tmp_path / "bytes.parquet"))
    rows = load_rows(str(tmp_path / "bytes.parquet"), image_options=OPTS)
    assert [r["images"][0].tobytes() for r in rows] == [p.tobytes() for p in pics]

    for i, p in enumerate(pics):
        p.save(tmp_path / f"{i}.png")
    features = datasets.Features({"prompt": datasets.Value("string"), "pic": datasets.Image()})
    datasets.Dataset.from_dict(
        {"prompt": ["a", "b", "c", "d"], "pic": [str(tmp_path / f"{i}.png") for i in range(4)]},
        features=features,
    ).to_parquet(str(tmp_path / "feature.parquet"))
    rows = load_rows(
        str(tmp_path / "feature.parquet"), n=2, seed=1, image_options={**OPTS, "column": "pic"}
    )
    drawn = ["abcd".index(r["prompt"]) for r in rows]
    assert [r["pic"][0].tobytes() for r in rows] == [pics[i].tobytes() for i in drawn]


def test_shapes_and_text_rows(tmp_path):
    shapes_rows = load_rows("shapes", n=3, image_options=OPTS)
    assert all(len(r["images"]) == 1 and r["images"][0].mode == "RGB" for r in shapes_rows)
    text = load_rows("arithmetic", n=3, image_options=OPTS)
    assert text == load_rows("arithmetic", n=3)


def _bad_file(tmp_path: Path, cells: list, **opts) -> str:
    (tmp_path / "ok.png").write_bytes(_png(_picture(0)))
    (tmp_path / "notes.png").write_text("not a picture\n")
    data = _write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"p{i}", "images": c} for i, c in enumerate(cells)]
    )
    with pytest.raises(ConfigError) as err:
        load_rows(str(data), n=len(cells), seed=5, image_options={**OPTS, **opts})
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_image_names_row_and_path(tmp_path):
    msg = _bad_file(tmp_path, [["ok.png"], ["ok.png"], ["ok.png", "gone/x.png"], ["ok.png"]])
    assert "row 2: image 'gone/x.png' does not exist" in msg
    assert str(tmp_path / "gone" / "x.png") in msg


def test_unreadable_image_names_row_and_path(tmp_path):
    msg = _bad_file(tmp_path, [["ok.png"], ["notes.png"]])
    assert "row 1: image 'notes.png' could not be read as an image" in msg
    with pytest.raises(ConfigError, match=r"'mem' row 0: image 1 \(bytes\) could not be read as"):
        load_images([{"images": [_png(_picture(0)), b"\x89PNG garbage"]}], source="mem", **OPTS)


def test_too_many_and_too_large_images(tmp_path):
    msg = _bad_file(tmp_path, [["ok.png"], ["ok.png"] * 3], max_images=2)
    assert "row 1: 3 images in 'images', over data.max_images_per_prompt=2" in msg
    msg = _bad_file(tmp_path, [["ok.png"]], max_pixels=100)
    assert "row 0: image 'ok.png' is 12x10 = 120 pixels, over data.max_image_pixels=100" in msg


def test_other_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match=r"row 0: image 0 \(dict\): an image dict needs"):
        load_images([{"images": {"url": "x"}}], source="mem", **OPTS)
    with pytest.raises(ConfigError, match=r"row 0: image 0 \(value\) is a int"):
        load_images([{"images": 7}], source="mem", **OPTS)
    with pytest.raises(ConfigError, match=r"data.image_column='pics' is not a column.*prompt"):
        load_images([{"prompt": "p"}], source="mem", **{**OPTS, "column": "pics"})
    with pytest.raises(ConfigError, match=r"data.max_images_per_prompt=0 is not valid"):
        load_images([], source="mem", **{**OPTS, "max_images": 0})
