"""Checkpoint files written atomically on any filesystem.

Lightning's default writer stages a checkpoint in the system temp folder and moves it into place;
when the checkpoint folder is on another filesystem (NFS or Lustre checkpoints, local ``/tmp``:
the normal case on clusters) the move is a copy that truncates ``last.ckpt`` in place, so a
killed job or a full disk leaves it unloadable. :class:`AtomicCheckpointIO` writes to a hidden
temporary file in the destination folder (``torch.save`` streams into it: no copy of the
checkpoint in memory), flushes and fsyncs it, renames it over the old file
(``os.replace``: atomic within a filesystem) and fsyncs the folder. A write that fails removes its
temporary file and leaves the previous checkpoint as it was; a process killed mid-write leaves
only a hidden ``.NAME.tmp-PID`` file, which the next save in that folder removes.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any, BinaryIO, Callable, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_dlm.core.errors import DLMError

_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
_CHUNK = 1 << 22  # bytes per write call


def temp_path(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: str) -> list:
    """Delete the temporary files of writes whose process is gone (killed mid-write); returns them."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for entry in os.listdir(folder):
        match = _TEMP.match(entry)
        if match and not _pid_alive(int(match.group("pid"))):
            os.remove(os.path.join(folder, entry))
            removed.append(entry)
    return removed


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomically(path: str, fill: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``fill(fh)`` writes the contents into a temporary file in the same
    folder, which is flushed, fsynced and renamed over ``path``; on failure it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp_files(folder)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):
            kept = "the previous checkpoint there is intact" if os.path.exists(path) else "nothing was written"
            reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
            raise DLMError(f"could not write checkpoint {path} ({reason}); {kept}: free space or choose another "
                           f"--trainer.default_root_dir, then resume from the last good checkpoint") from None
        raise
    _fsync_folder(folder)


def atomic_write(path: str, payload: bytes, write: Optional[Callable[[Any, bytes], None]] = None) -> None:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    ``write(fh, chunk)`` writes one chunk (default ``fh.write``; tests pass a failing one).
    """
    write = write or (lambda fh, chunk: fh.write(chunk))

    def fill(fh: BinaryIO) -> None:
        view = memoryview(payload)
        for start in range(0, len(view), _CHUNK):
            write(fh, view[start:start + _CHUNK])

    _write_atomically(path, fill)


def atomic_save(path: str, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically, streamed into the temporary file: the tensors are
    written from their own memory, with no serialised copy of ``obj`` held in RAM (at 7B, weights and
    optimiser state are tens of GB)."""

    def fill(fh: BinaryIO) -> None:
        try:
            torch.save(obj, fh)
        except RuntimeError as err:  # torch's writer reports a failed write (a full disk) as its own error
            cause = _os_error_behind(err)
            if cause is None:
                raise
            raise cause from None

    _write_atomically(path, fill)


def _os_error_behind(err: BaseException) -> Optional[OSError]:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic, fsynced writes in the destination folder."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_save(str(path), checkpoint)
