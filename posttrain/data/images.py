"""Images in prompt rows: the image column's cells decoded to RGB PIL images, limits checked, and
chat messages with image parts.

A cell (`data.image_column`, default ``images``) is one image or a list of them; each is a path
(relative to the data file's directory, or absolute), raw encoded bytes, a `datasets.Image`-style
dict ``{"bytes": ..., "path": ...}``, or a PIL image. ``None`` (or a missing cell) is a row without
images. After `load_images` every row's cell is a list of RGB PIL images.

A missing or unreadable image, more than `data.max_images_per_prompt` images in a row, or an image
over `data.max_image_pixels` pixels raises one ConfigError naming the row (0-based, its index in the
data file) and the image.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError

DEFAULT_IMAGE_COLUMN = "images"
DEFAULT_MAX_IMAGES = 4
DEFAULT_MAX_PIXELS = 4096 * 4096


def image_messages(
    prompt_text: str, n_images: int, system_prompt: str | None = None
) -> list[dict[str, Any]]:
    """Chat messages for a prompt with images: the image parts first, then the text.

    Args:
        prompt_text: the user's text.
        n_images: number of ``{"type": "image"}`` parts (one per image of the row, in order).
        system_prompt: an optional system message (plain string content) put first.

    Returns:
        ``[{"role": "user", "content": [{"type": "image"}, ..., {"type": "text", "text": ...}]}]``
        (after the system message when given).
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    parts.append({"type": "text", "text": prompt_text})
    messages: list[dict[str, Any]] = [{"role": "user", "content": parts}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _cells(value: Any) -> list[Any]:
    """The images of one cell as a list (a lone image, a list of them, or none)."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [v for v in value if v is not None]
    return [value]


def _name(item: Any, k: int) -> str:
    """How a message names image `k` of a row: ``image 'a.png'`` (its path), else by position."""
    if isinstance(item, str | Path):
        return f"image {str(item)!r}"
    if isinstance(item, dict):
        if item.get("path") and not item.get("bytes"):
            return f"image {str(item['path'])!r}"
        return f"image {k} ({'bytes' if item.get('bytes') else 'dict'})"
    return f"image {k} ({'bytes' if isinstance(item, bytes | bytearray) else 'value'})"


def _open(item: Any, base_dir: Path | None, where: str) -> Any:
    """A lazily decoded PIL image of one cell item (only its header read so far)."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, dict):
        unknown = set(item) - {"bytes", "path"}
        if unknown or not (item.get("bytes") or item.get("path")):
            raise ConfigError(
                f"{where}: an image dict needs 'bytes' or 'path' (datasets.Image style), got keys "
                f"{sorted(map(str, item))}"
            )
        item = item["bytes"] or item["path"]
    if isinstance(item, bytes | bytearray):
        return Image.open(io.BytesIO(bytes(item)))
    if isinstance(item, str | Path):
        path = Path(item).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ConfigError(f"{where} does not exist (looked for {str(path)!r})")
        return Image.open(path)
    raise ConfigError(
        f"{where} is a {type(item).__name__}; use a path, bytes, a {{'bytes', 'path'}} dict or a "
        "PIL image"
    )


def decode_image(item: Any, *, base_dir: Path | None, where: str, max_pixels: int) -> Any:
    """One cell item as an RGB PIL image (fully decoded).

    Args:
        item: a path, encoded bytes, a ``{"bytes", "path"}`` dict or a PIL image.
        base_dir: directory relative paths are resolved against (None: the working directory).
        where: how messages name the image, e.g. ``"data file 'd.jsonl' row 3: image 'a.png'"``.
        max_pixels: the largest width * height allowed (checked before the pixels are decoded).

    Raises:
        ConfigError: missing file, not an image, or too many pixels.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = _open(item, base_dir, where)
        width, height = image.size
        if width * height > max_pixels:
            raise ConfigError(
                f"{where} is {width}x{height} = {width * height} pixels, over "
                f"data.max_image_pixels={max_pixels}; resize it or raise data.max_image_pixels"
            )
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except ConfigError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where} could not be read as an image: {reason}") from e


def check_limits(max_images: int, max_pixels: int) -> None:
    """Raise ConfigError for a limit that is not a positive integer (names the config key)."""
    for key, value in (("max_images_per_prompt", max_images), ("max_image_pixels", max_pixels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"data.{key}={value!r} is not valid; use an integer >= 1")


def load_images(
    rows: list[dict[str, Any]],
    *,
    source: str,
    column: str = DEFAULT_IMAGE_COLUMN,
    base_dir: Path | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    row_numbers: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Replace every row's image cell by a list of RGB PIL images (in place; rows returned).

    Rows without the column (a text-only dataset) are left as they are when `column` is the
    default; a non-default column that no row has is an error.

    Args:
        rows: loaded rows.
        source: where the rows came from, for messages.
        column: the image column (`data.image_column`).
        base_dir: directory of the data file (relative image paths resolve against it).
        max_images: most images one row may hold (`data.max_images_per_prompt`).
        max_pixels: largest width * height of one image (`data.max_image_pixels`).
        row_numbers: the row number messages give each row (its index in the data file when the
            rows were drawn from it); None: the position in `rows`.

    Raises:
        ConfigError: a bad limit, a missing column, or a bad image (one line: row and image).
    """
    check_limits(max_images, max_pixels)
    if not any(column in row for row in rows):
        if column != DEFAULT_IMAGE_COLUMN and rows:
            raise ConfigError(
                f"data.image_column={column!r} is not a column of {source!r}; available: "
                f"{', '.join(map(str, rows[0]))}"
            )
        return rows
    for pos, row in enumerate(rows):
        i = pos if row_numbers is None else row_numbers[pos]
        items = _cells(row.get(column))
        if len(items) > max_images:
            raise ConfigError(
                f"{source!r} row {i}: {len(items)} images in {column!r}, over "
                f"data.max_images_per_prompt={max_images}; drop some or raise the limit"
            )
        row[column] = [
            decode_image(
                item,
                base_dir=base_dir,
                where=f"{source!r} row {i}: {_name(item, k)}",
                max_pixels=max_pixels,
            )
            for k, item in enumerate(items)
        ]
    return rows
