"""Storage faults while a checkpoint is written: a full disk told apart from other failures, and
the one line the run ends with (`StorageError`, exit status 2: the environment needs fixing).

A full disk does not always say so: `torch.save` (DeepSpeed's engine state) reports a failed write
as a `RuntimeError` ("unexpected pos ...", "file write failed") without the errno. So a failure
counts as "no space left on device" when its chain names ENOSPC/EDQUOT, or when the filesystem it
was writing to has (almost) no free space left right after it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from posttrain.errors import StorageError

OK, NO_SPACE, OS_ERROR, OTHER = 0, 1, 2, 3  # a rank's outcome, as agreed between ranks
LOW_SPACE_BYTES = 1 << 20  # less free than this after a failed write: the disk is full
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28")


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and its causes/contexts (at most 10)."""
    out: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and len(out) < 10 and seen not in out:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


def free_bytes(where: Path) -> int | None:
    """Free bytes on the filesystem holding `where` (its nearest existing parent); None if
    unknown."""
    path = Path(where)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def out_of_space(err: BaseException, where: Path) -> bool:
    """Whether `err`, raised while writing under `where`, means the disk (or quota) is full."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS:
            return True
        if any(t in str(e) for t in _NO_SPACE_TEXT):
            return True
    free = free_bytes(where)
    return free is not None and free < LOW_SPACE_BYTES


def failure_code(err: BaseException | None, where: Path) -> int:
    """`OK`, `NO_SPACE`, `OS_ERROR` (another I/O failure) or `OTHER` (no storage fault)."""
    if err is None:
        return OK
    if out_of_space(err, where):
        return NO_SPACE
    if any(isinstance(e, OSError) for e in _chain(err)):
        return OS_ERROR
    return OTHER


def _what(code: int, err: BaseException | None) -> str:
    if code == NO_SPACE:
        return "no space left on device (ENOSPC)"
    oserr = next((e for e in _chain(err) if isinstance(e, OSError)), None) if err else None
    if oserr is not None:
        return f"{oserr.strerror or oserr}"
    return "a write failed" if code == OS_ERROR else "an error (see that rank's output)"


def save_error(
    ckpt_dir: Path, codes: list[int], rank: int, err: BaseException | None, newest: Path | None
) -> StorageError:
    """The one-line error every rank raises when the checkpoint `ckpt_dir` was not written.

    Args:
        ckpt_dir: the checkpoint's final path.
        codes: [world] each rank's `failure_code` (at least one not `OK`), found before the
            partial directory was removed.
        rank: this rank.
        err: this rank's failure, None when only other ranks failed.
        newest: the newest complete checkpoint (`checkpoint.latest`), None when there is none.
    """
    failed = [r for r, c in enumerate(codes) if c != OK]
    mine = err is not None and codes[rank] != OK
    code = codes[rank] if mine else codes[failed[0]]
    who = "" if len(codes) == 1 else f" (rank {', '.join(map(str, failed))})"
    tmp = ckpt_dir.name + ".tmp"
    then = (
        f"newest complete checkpoint: {newest} (free space, then continue with train.resume=auto)"
        if newest is not None
        else "no complete checkpoint was saved before it (free space, then rerun)"
    )
    return StorageError(
        f"checkpoint {ckpt_dir} could not be written: {_what(code, err if mine else None)}"
        f"{who}; the partial {tmp} was removed; {then}"
    )


def append_line(path: Path, line: str) -> None:
    """Append one line to a run log (`metrics.jsonl`, `data_ids.jsonl`) and fsync it; a write
    that fails leaves the file as it was (the partial line cut off), so readers never see a torn
    line in the middle after a resume.

    Args:
        path: the log file (created if missing).
        line: the text, ending with a newline.

    Raises:
        StorageError: the write failed (the disk is full, or another I/O error), naming the file.
    """
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:  # one call in practice: a kill leaves the line whole or torn at its end
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise append_error(path, err) from err
    finally:
        os.close(fd)


def append_error(path: Path, err: OSError) -> StorageError:
    """The one line a run ends with when appending to its log `path` failed."""
    code = NO_SPACE if out_of_space(err, path) else OS_ERROR
    return StorageError(
        f"could not append to {path}: {_what(code, err)}; the partial line was removed; "
        f"free space, then continue with train.resume=auto (the newest checkpoint in "
        f"{path.parent / 'checkpoints'})"
    )
