"""Checksums of a shipped model folder, kept beside it: ``<folder>.sha256``.

A folder the project ships in git (``experiments/micro/model``, the micro world's pretrained AR
model) is what every later step starts from, so a changed byte would silently change every result.
Its files' SHA-256 digests sit beside it in ``sha256sum``'s format (``<hex>  <file name>``, one
line a file); :func:`verify_folder` checks them whenever the folder is loaded (as a pretrained
backbone, or by ``DiffusionModel.from_pretrained``), and refuses a missing, changed or extra file
in one line that says how to restore it. A line ``# rebuild: <command>`` in the checksum file names
the command that rebuilds the folder (quoted in that line). A folder without a checksum file
beside it is not checked.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, Optional

from lightning_dlm.core.errors import DLMError

RESTORE = "restore it with `git checkout -- {folder}`"
REBUILD_PREFIX = "# rebuild: "


def checksum_path(folder: str) -> str:
    return os.path.normpath(folder) + ".sha256"


def digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def folder_digests(folder: str) -> Dict[str, str]:
    """``file name -> SHA-256`` of every file directly in ``folder``."""
    return {name: digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def write_checksums(folder: str, rebuild: Optional[str] = None) -> str:
    """Write ``<folder>.sha256`` for the files of ``folder`` (with ``rebuild``, the command that
    rebuilds it, as its first line); returns its path."""
    path = checksum_path(folder)
    with open(path, "w", encoding="utf-8") as fh:
        if rebuild:
            fh.write(f"{REBUILD_PREFIX}{rebuild}\n")
        for name, hexdigest in folder_digests(folder).items():
            fh.write(f"{hexdigest}  {name}\n")
    return path


def rebuild_command(path: str) -> Optional[str]:
    """The command a checksum file names in its ``# rebuild:`` line, if any."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(REBUILD_PREFIX):
                return line[len(REBUILD_PREFIX):].strip() or None
    return None


def read_checksums(path: str) -> Dict[str, str]:
    out = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("  ", 1)
            if len(parts) != 2 or len(parts[0]) != 64:
                raise DLMError(f"'{path}' line {number} is not '<sha256>  <file name>': restore the file from git")
            out[parts[1]] = parts[0]
    return out


def verify_folder(folder: str) -> Optional[str]:
    """Check ``folder`` against ``<folder>.sha256`` when that file exists (else do nothing).
    Returns the checksum file's path, or None when there is none."""
    path = checksum_path(folder)
    if not os.path.isfile(path):
        return None
    restore = RESTORE.format(folder=folder)
    rebuild = rebuild_command(path)
    if rebuild:
        restore += f", or rebuild it with `{rebuild}`"
    if not os.path.isdir(folder):
        raise DLMError(f"model folder '{folder}' is missing (its checksums are in {path}): {restore}")
    expected = read_checksums(path)
    for name, hexdigest in expected.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise DLMError(f"'{folder}' lacks {name}, which {path} lists: {restore}")
        if digest(file) != hexdigest:
            raise DLMError(f"'{folder}/{name}' differs from its checksum in {path} (the file was altered): {restore}")
    extra = [name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name)) and name not in expected]
    if extra:
        raise DLMError(f"'{folder}' holds {', '.join(sorted(extra))}, which {path} does not list: remove it, or {restore}")
    return path
