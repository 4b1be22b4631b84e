"""Undoing what a run wrote to its output directory when it stops on a user mistake.

A ConfigError found after the run directory was made (a data row, a tokenizer, a reward name...)
leaves the directory as it was: removed if the run created it, else each top-level entry the run
added removed and each file it appended to (third_party.log, metrics.jsonl) cut back to its
size before.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# None: the directory did not exist; else the size of each top-level file (-1 for a directory)
Snapshot = dict[str, int] | None


def snapshot(out: Path) -> Snapshot:
    """What is in `out` now (see `Snapshot`)."""
    if not out.is_dir():
        return None
    return {p.name: p.stat().st_size if p.is_file() else -1 for p in out.iterdir()}


def restore(out: Path, before: Snapshot) -> None:
    """Put `out` back as `before` found it (new entries removed, grown files truncated)."""
    if before is None:
        shutil.rmtree(out, ignore_errors=True)
        return
    if not out.is_dir():
        return
    for entry in out.iterdir():
        size = before.get(entry.name)
        if size is None:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        elif size >= 0 and entry.is_file() and entry.stat().st_size > size:
            with entry.open("r+b") as f:
                f.truncate(size)
