"""Storage faults, the pure pieces: which failures mean a full disk, and the one-line error."""

from __future__ import annotations

import errno
from pathlib import Path

from posttrain.errors import StorageError
from posttrain.runtime import storage


def _raised_from(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as err:
            raise outer from err
    except Exception as err:
        return err


def test_full_disk_is_told_from_other_failures(tmp_path):
    # tmp_path's filesystem has more than LOW_SPACE_BYTES free, so only the errors speak
    assert storage.free_bytes(tmp_path) > storage.LOW_SPACE_BYTES
    nospace = OSError(errno.ENOSPC, "No space left on device")
    assert storage.failure_code(nospace, tmp_path) == storage.NO_SPACE
    assert storage.failure_code(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path) == 1
    # safetensors' error (no errno) and a wrapped one
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert storage.failure_code(rust, tmp_path) == storage.NO_SPACE
    wrapped = _raised_from(RuntimeError("save failed"), nospace)
    assert storage.failure_code(wrapped, tmp_path) == storage.NO_SPACE
    assert storage.failure_code(PermissionError(errno.EACCES, "denied"), tmp_path) == 2
    # torch.save's zip writer says nothing of the cause: not a full disk while space is left
    zip_err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576")
    assert storage.failure_code(zip_err, tmp_path) == storage.OTHER
    assert storage.failure_code(ValueError("a bug"), tmp_path) == storage.OTHER
    assert storage.failure_code(None, tmp_path) == storage.OK
    # a path that does not exist yet is measured on its nearest existing parent
    assert storage.free_bytes(tmp_path / "a" / "b.tmp") == storage.free_bytes(tmp_path)


def test_save_error_is_one_line_naming_the_checkpoint_and_what_to_do():
    ckpt = Path("/runs/x/checkpoints/step-000004")
    newest = Path("/runs/x/checkpoints/step-000002")
    nospace = OSError(errno.ENOSPC, "No space left on device")
    err = storage.save_error(ckpt, [storage.NO_SPACE], 0, nospace, newest)
    assert isinstance(err, StorageError)
    assert str(err) == (
        "checkpoint /runs/x/checkpoints/step-000004 could not be written: no space left on "
        "device (ENOSPC); the partial step-000004.tmp was removed; newest complete checkpoint: "
        "/runs/x/checkpoints/step-000002 (free space, then continue with train.resume=auto)"
    )
    # rank 1 failed; rank 0 only learned of it
    other = storage.save_error(ckpt, [storage.OK, storage.NO_SPACE], 0, None, None)
    assert "no space left on device (ENOSPC) (rank 1)" in str(other)
    assert str(other).endswith(
        "no complete checkpoint was saved before it (free space, then rerun)"
    )
    denied = storage.save_error(ckpt, [storage.OS_ERROR], 0, PermissionError(13, "denied"), None)
    assert "could not be written: denied;" in str(denied)
    assert "\n" not in str(err) + str(other) + str(denied)
