"""Run folders: each run's checkpoints live under its own root, and a fresh run never writes over
another run's checkpoints."""

from __future__ import annotations

import os
from typing import Any, List, Optional

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
