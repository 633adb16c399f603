"""The export writer: a transformers model, its tokenizer and ``diffusion_config.json`` written
into a new or empty folder, atomically (a staging folder beside it, renamed at the end), so a
failure leaves nothing half-written and nothing is ever overwritten.

It writes what it is given; reading a checkpoint and assembling its model is
:mod:`lightning_dlm.model.pretrained`'s (``DiffusionModel.save_pretrained`` and ``dlm export`` call
this writer). ``AutoModelForCausalLM.from_pretrained(folder)`` loads the result with bidirectional
attention (the config says ``is_causal: false``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Callable, Dict, Optional

from lightning_dlm.core.errors import DLMError
from lightning_dlm.io.format import EXPORT_CONFIG


def check_out_dir(out: str) -> None:
    """The destination must not exist, or be an empty folder: nothing is ever overwritten."""
    if os.path.isdir(out):
        if os.listdir(out):
            raise DLMError(f"output folder '{out}' is not empty: give a new or empty folder (nothing was written)")
    elif os.path.exists(out):
        raise DLMError(f"output path '{out}' is a file: give a new or empty folder (nothing was written)")


def write_export_folder(out: str, model, tokenizer, config: Optional[Dict[str, Any]],
                        progress: Optional[Callable[[str], None]] = None) -> str:
    """Write the export format into ``out`` (new or empty): the transformers ``model``
    (safetensors), the ``tokenizer`` (naming the mask token) and ``config`` as
    ``diffusion_config.json``. Written under a temporary name beside ``out`` and renamed at the
    end, so a failure leaves nothing half-written. ``config=None`` writes a plain transformers
    causal LM folder (no ``diffusion_config.json``): what ``model.backbone.pretrained`` adapts."""
    say = progress or (lambda line: None)
    out = os.path.abspath(out)
    check_out_dir(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(out)}.export-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)
    try:
        say(f"writing {out}")
        model.save_pretrained(staging, max_shard_size="5GB")
        tokenizer.save_pretrained(staging)
        if config is not None:
            with open(os.path.join(staging, EXPORT_CONFIG), "w", encoding="utf-8") as fh:
                json.dump(config, fh, indent=2)
                fh.write("\n")
            _check_saved_tokenizer(staging, config["mask_token_id"])
        _readable_like_siblings(staging)
        check_out_dir(out)  # again: something may have appeared there meanwhile
        try:
            os.rename(staging, out)  # atomic; replaces an empty folder
        except OSError as err:
            raise DLMError(f"could not move the export into '{out}' ({err.strerror}): give a new or empty folder") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"exported to {out}")
    return out


def _check_saved_tokenizer(folder: str, mask_id: int) -> None:
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(folder, trust_remote_code=False).mask_token_id
    if saved != mask_id:
        raise DLMError(f"the saved tokenizer's mask token id is {saved}, not {mask_id}: the tokenizer cannot name the mask token")


def _readable_like_siblings(folder: str) -> None:
    """Every file of the export gets the mode a new file gets under the current umask (safetensors
    writes its file 0600 through a temporary file; the config and tokenizer files are 0644)."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)
