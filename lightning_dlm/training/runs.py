"""Run folders: each run's checkpoints live under its own root, a fresh run never writes over
another run's checkpoints, and a run folder belongs to one run at a time (:class:`RunLock`)."""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from typing import Any, Dict, List, Optional

try:
    import fcntl
except ImportError:  # not POSIX: the lock file's record alone decides
    fcntl = None

from lightning_dlm.core.errors import DLMError

DEFAULT_ROOT = "runs"


def _get(section: Any, key: str, default=None):
    if section is None:
        return default
    if isinstance(section, dict):
        return section.get(key, default)
    return getattr(section, key, default)


def checkpoint_dir(config: Any) -> str:
    """``checkpoint.dirpath`` if given, else ``<trainer.default_root_dir>/checkpoints``."""
    given = _get(_get(config, "checkpoint"), "dirpath")
    if given:
        return str(given)
    root = _get(_get(config, "trainer"), "default_root_dir") or DEFAULT_ROOT
    return os.path.join(str(root), "checkpoints")


def existing_checkpoints(folder: str) -> List[str]:
    """Checkpoint files (``*.ckpt``) and sharded checkpoint folders (``*.ckpt/``) in ``folder``."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if name.endswith(".ckpt") and not name.startswith("."))


def isolate_run(config: Any, subcommand: Optional[str]) -> str:
    """Point ``checkpoint.dirpath`` at the run's own folder and refuse a fresh ``fit`` into a
    folder that already holds checkpoints. Returns the checkpoint folder."""
    folder = checkpoint_dir(config)
    section = _get(config, "checkpoint")
    if section is not None:
        if isinstance(section, dict):
            section["dirpath"] = folder
        else:
            section.dirpath = folder
    if subcommand == "fit" and not _get(config, "ckpt_path"):
        found = existing_checkpoints(folder)
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            last = os.path.join(folder, "last.ckpt" if "last.ckpt" in found else found[-1])
            raise DLMError(
                f"{folder} already holds checkpoints of a run ({shown}): resume it with --ckpt_path {last}, "
                f"or start this run in another folder (--trainer.default_root_dir)"
            )
    return folder


# --- one run per folder ---------------------------------------------------------------------------

LOCK_NAME = ".dlm.lock"
#: set by ``dlm sweep`` for the ``dlm fit`` of an arm: the descriptor of the arm's lock, which it holds
LOCK_FD_ENV = "DLM_RUN_LOCK_FD"
#: ranks of a multi-process launch (torchrun, Lightning's launcher, SLURM): only rank 0 locks
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def launching_rank() -> bool:
    """Whether this process is the one that locks a run: rank 0 of a multi-process launch, or the
    only process (the other ranks of a run share the lock their rank 0 holds)."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, another user's
        return True
    return True


def _read_holder(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.loads(fh.read() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _same_file(fd: int, path: str) -> bool:
    try:
        now, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _flock(fd: int) -> Optional[bool]:
    """True: locked; False: another process holds it; None: this filesystem has no locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


class RunLock:
    """An exclusive lock on a run folder for the run's lifetime: ``<folder>/.dlm.lock``, locked
    with ``flock`` (the kernel drops it when its process ends, ``kill -9`` included) and holding
    the holder's PID, host, command and start time. A second run into the folder stops with one
    line naming the holder; a lock file left by a run that died is taken over (with ``flock``
    that is any unlocked file; without it, a record of a PID that is gone on this host).
    ``release`` deletes the file, and the folders made for it if they stayed empty."""

    def __init__(self, folder: str, command: str = "dlm fit",
                 fix: str = "wait for it to end, or start this run in another folder (--trainer.default_root_dir)"):
        self.folder = str(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.command, self.fix = command, fix
        self.fd: Optional[int] = None
        self.inherited = False  # held by the dlm sweep that started this process (it releases it)
        self.took_over: Dict[str, Any] = {}  # the record of a dead holder whose lock this one took over
        self._made: List[str] = []

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _busy(self, holder: Dict[str, Any]) -> DLMError:
        if holder.get("pid"):
            who = f"{holder.get('command', 'a run')}, PID {holder['pid']} on host {holder.get('host', '?')}"
            who += f", since {holder['since']}" if holder.get("since") else ""
        else:
            who = "a run that is starting"
        return DLMError(f"{self.folder} is in use by another run ({who}; lock file {self.path}): {self.fix}")

    def _adopt(self) -> bool:
        value = os.environ.get(LOCK_FD_ENV, "")
        if not value.isdigit() or not _same_file(int(value), self.path) or _flock(int(value)) is False:
            return False
        self.fd, self.inherited = int(value), True
        os.environ.pop(LOCK_FD_ENV, None)  # not for the processes this one starts
        return True

    def acquire(self) -> "RunLock":
        """Take the lock (DLMError naming the holder if another live run has it); returns self."""
        if self.fd is not None or self._adopt():
            return self
        try:
            self._made = _makedirs(self.folder)
            self.fd = self._take()
            record = dict(pid=os.getpid(), host=socket.gethostname(), command=self.command,
                          since=time.strftime("%Y-%m-%d %H:%M:%S"))
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
            os.write(self.fd, json.dumps(record).encode())
        except OSError as err:  # a folder that cannot be written (permissions, a full disk)
            self.release()
            raise DLMError(f"cannot lock the run folder {self.folder} ({err.strerror or err}): give a folder this user "
                           f"can write (--trainer.default_root_dir)") from None
        except BaseException:
            self.release()
            raise
        return self

    def _take(self) -> int:
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                locked = _flock(fd)
                if locked is None:  # no locks on this filesystem: the record decides
                    holder = _read_holder(self.path)
                    if holder.get("pid") and not self._stale(holder) and holder.get("pid") != os.getpid():
                        raise self._busy(holder)
                    self.took_over = holder
                    return fd
                if not _same_file(fd, self.path):  # its holder released (deleted) it meanwhile: again
                    os.close(fd)
                    continue
                if not locked:
                    holder = {}
                    for _ in range(10):  # the holder writes its record right after locking
                        holder = _read_holder(self.path)
                        if holder.get("pid"):
                            break
                        time.sleep(0.05)
                    raise self._busy(holder)
                self.took_over = _read_holder(self.path)  # a record left by a run that died
                return fd
            except BaseException:
                if _fd_open(fd):
                    os.close(fd)
                raise
        raise DLMError(f"could not lock {self.path} (it keeps being replaced): check what else writes to {self.folder}")

    @staticmethod
    def _stale(holder: Dict[str, Any]) -> bool:
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and (not isinstance(pid, int) or not _alive(pid))

    def release(self) -> None:
        """Give the lock back (an inherited one stays with the sweep that holds it)."""
        if self.fd is None:
            self._remove_made()  # a lock that was not taken: the folders made for it
            return
        fd, self.fd = self.fd, None
        if not self.inherited:
            if _same_file(fd, self.path):
                try:
                    os.remove(self.path)  # while still locked: the next run locks a new file
                except OSError:
                    pass
            self._remove_made()
        os.close(fd)

    def _remove_made(self) -> None:
        for folder in reversed(self._made):
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._made = []


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _makedirs(folder: str) -> List[str]:
    """Create ``folder`` and its missing parents; returns the folders created, outermost first."""
    missing = []
    path = os.path.abspath(folder)
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    missing.reverse()
    made = []
    for path in missing:
        try:
            os.mkdir(path)
            made.append(path)
        except FileExistsError:
            pass
    return made


def _local(path: str) -> bool:
    return "://" not in str(path)


def lock_run(config: Any, subcommand: Optional[str]) -> List[RunLock]:
    """``fit``: lock the run folder (``trainer.default_root_dir``), and the checkpoint folder when
    ``checkpoint.dirpath`` lies outside it, for the run's lifetime; the caller releases them
    (:func:`release_run`). Only the launching process (rank 0) locks; other subcommands do not."""
    if subcommand != "fit" or not launching_rank():
        return []
    root = str(_get(_get(config, "trainer"), "default_root_dir") or DEFAULT_ROOT)
    folders = [root]
    ckpt = checkpoint_dir(config)
    real_root, real_ckpt = os.path.realpath(root), os.path.realpath(ckpt)
    if real_ckpt != real_root and not real_ckpt.startswith(os.path.join(real_root, "")):
        folders.append(ckpt)
    locks: List[RunLock] = []
    try:
        for folder in folders:
            if _local(folder):
                locks.append(RunLock(folder).acquire())
    except BaseException:
        release_run(locks)
        raise
    for lock in locks:
        if lock.took_over.get("pid"):
            print(f"lock: {lock.folder} was left locked by PID {lock.took_over['pid']} on host "
                  f"{lock.took_over.get('host', '?')}, which ended without releasing it: this run takes it over", file=sys.stderr)
    return locks


def release_run(locks: List[RunLock]) -> None:
    for lock in reversed(locks):
        lock.release()
