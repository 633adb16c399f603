"""``dlm export``: write a checkpoint's model as a Hugging Face folder.

    dlm export --ckpt runs/debug/checkpoints/last.ckpt --out exported/debug
    dlm export --ckpt runs/diffullama_7b/checkpoints/last.ckpt --out exported/diffullama --dtype bfloat16
"""

from __future__ import annotations

import sys
from typing import List, Literal

from jsonargparse import ActionYesNo, ArgumentParser

from lightning_dlm.commands.sample import TRUST_HELP


def _progress(line: str) -> None:
    print(f"[dlm export] {line}", file=sys.stderr, flush=True)


def export_checkpoint(ckpt: str, out: str, dtype: Literal["keep", "float32", "bfloat16"] = "keep",
                      trust_checkpoint: bool = False) -> None:
    """Export a lightning_dlm checkpoint as a Hugging Face folder (safetensors weights, config,
    tokenizer with the mask token, diffusion_config.json).

    Args:
        ckpt: a .ckpt file or a sharded checkpoint folder written by `dlm fit`.
        out: the folder to write (must not exist, or be empty).
        dtype: dtype of the exported weights: keep (the checkpoint's), float32 or bfloat16.
        trust_checkpoint: unpickle the checkpoint in full, which runs any code in it: only for a file
            whose author you trust (by default only tensors and plain data are read).
    """
    from lightning_dlm.export import export

    export(ckpt, out, dtype=dtype, progress=_progress, trust_checkpoint=trust_checkpoint)


def export_command(args: List[str]) -> None:
    parser = ArgumentParser(prog="dlm export", description="Export a lightning_dlm checkpoint as a Hugging Face folder.")
    parser.add_function_arguments(export_checkpoint, as_group=False, skip={"trust_checkpoint"})
    parser.add_argument("--trust_checkpoint", action=ActionYesNo, default=False, help=TRUST_HELP)
    cfg = parser.parse_args(args)
    export_checkpoint(**cfg.as_dict())
