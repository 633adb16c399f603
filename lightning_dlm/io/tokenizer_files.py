"""A tokenizer as {file name: base64 content}: how checkpoints carry their tokenizer.

Reading runs no code and writes only where it should: every stored name must be a plain file
name, and every content is decoded before anything is written.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from typing import Dict

from lightning_dlm.core.errors import DLMError
from lightning_dlm.io.safe_read import check_plain_names


def tokenizer_to_files(tokenizer) -> Dict[str, str]:
    """Serialise a tokenizer into {file name: base64 content} (storable in a checkpoint)."""
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {}
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as fh:
                files[name] = base64.b64encode(fh.read()).decode("ascii")
    return files


def tokenizer_from_files(files: Dict[str, str], trust_remote_code: bool = False):
    """The tokenizer of :func:`tokenizer_to_files`' mapping. Every name is checked (a plain file name)
    and every content decoded before anything is written. The files' own Python code (a
    tokenizer_config.json ``auto_map``) never runs unless ``trust_remote_code`` (a trusted checkpoint
    whose model needs remote code): transformers would otherwise ask on a terminal, and run it on a yes."""
    if not isinstance(files, dict):
        raise DLMError("the checkpoint's tokenizer files are not a {name: content} mapping: the checkpoint is damaged")
    check_plain_names(files, "tokenizer file name", "the checkpoint")
    decoded = {}
    for name, content in files.items():
        try:
            decoded[name] = base64.b64decode(content, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise DLMError(f"tokenizer file {name!r} in the checkpoint is not base64: the checkpoint is damaged") from None
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in decoded.items():
            with open(os.path.join(tmp, name), "xb") as fh:  # x: never follows or replaces an existing file
                fh.write(content)
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(tmp, trust_remote_code=trust_remote_code)  # files checked above; no hub
        except ValueError as err:
            if "custom code" not in str(err):
                raise
            raise DLMError("the checkpoint's tokenizer names custom Python code (auto_map in its tokenizer_config.json), "
                           "which lightning_dlm does not run from a checkpoint: give a checkpoint written by dlm fit") from None
