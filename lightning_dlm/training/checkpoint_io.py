"""Checkpoint files written atomically on any filesystem.

Lightning's default writer stages a checkpoint in the system temp folder and moves it into place;
when the checkpoint folder is on another filesystem (NFS or Lustre checkpoints, local ``/tmp``:
the normal case on clusters) the move is a copy that truncates ``last.ckpt`` in place, so a
killed job or a full disk leaves it unloadable. :class:`AtomicCheckpointIO` writes to a hidden
temporary file in the destination folder, flushes and fsyncs it, renames it over the old file
(``os.replace``: atomic within a filesystem) and fsyncs the folder. A write that fails removes its
temporary file and leaves the previous checkpoint as it was; a process killed mid-write leaves
only a hidden ``.NAME.tmp-PID`` file, which the next save in that folder removes.
"""

from __future__ import annotations

import errno
import io
import os
import re
from typing import Any, Callable, Optional

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


def atomic_write(path: str, payload: bytes, write: Optional[Callable[[Any, bytes], None]] = None) -> None:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    ``write(fh, chunk)`` writes one chunk (default ``fh.write``; tests pass a failing one).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp_files(folder)
    tmp = temp_path(path)
    write = write or (lambda fh, chunk: fh.write(chunk))
    try:
        with open(tmp, "wb") as fh:
            view = memoryview(payload)
            for start in range(0, len(view), _CHUNK):
                write(fh, view[start:start + _CHUNK])
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic, fsynced writes in the destination folder."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(str(path), buffer.getbuffer().tobytes())
