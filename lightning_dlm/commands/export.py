"""``dlm export``: write a checkpoint's model as a Hugging Face folder.

    dlm export --ckpt runs/debug/checkpoints/last.ckpt --out exported/debug
    dlm export --ckpt runs/diffullama_7b/checkpoints/last.ckpt --out exported/diffullama --dtype bfloat16
"""

from __future__ import annotations

import os
import sys
from typing import Callable, List, Literal, Optional

from jsonargparse import ActionYesNo, ArgumentParser

from lightning_dlm.commands.sample import TRUST_HELP
from lightning_dlm.core.errors import DLMError
from lightning_dlm.io.export import check_out_dir
from lightning_dlm.io.format import DTYPE_CHOICES
from lightning_dlm.io.safe_read import is_exported_folder, require_exists
from lightning_dlm.model.diffusion_model import DiffusionModel
from lightning_dlm.model.pretrained import load_model, save_causal_lm


def export(ckpt: str, out: str, dtype: str = "keep", progress: Optional[Callable[[str], None]] = None,
           trust_checkpoint: bool = False, causal_lm: bool = False) -> str:
    """Write the model of ``ckpt`` (a ``.ckpt`` or sharded checkpoint folder from ``dlm fit``) as a
    Hugging Face folder ``out`` (new or empty). ``dtype``: ``keep`` (the checkpoint's), ``float32``
    or ``bfloat16``. ``progress`` receives one line per stage. ``trust_checkpoint``: unpickle the
    checkpoint in full (code in it can run); by default only tensors and plain data are read.
    ``causal_lm``: write an AR run's model as a plain transformers causal LM folder instead.
    The model is assembled on the meta device from the checkpoint's own tensors, and the folder
    written under a temporary name and renamed at the end. Returns ``out``."""
    say = progress or (lambda line: None)
    out = os.path.abspath(out)
    check_out_dir(out)
    if dtype not in DTYPE_CHOICES:
        raise DLMError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPE_CHOICES)}")
    require_exists(ckpt)
    if is_exported_folder(ckpt):
        raise DLMError(f"'{ckpt}' is a folder written by `dlm export`, not a training checkpoint: it is exported "
                       f"already (DiffusionModel.from_pretrained(path).save_pretrained(out, dtype=...) converts it)")
    say(f"reading {ckpt}" + (" (consolidating the shards on the CPU)" if os.path.isdir(ckpt) else ""))
    model = load_model(ckpt, DiffusionModel, trust_checkpoint=trust_checkpoint, dtype=DTYPE_CHOICES[dtype])
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {model.config.model_type}, {n_params / 1e6:.2f}M parameters, "
        f"{str(model.model.dtype).replace('torch.', '')}, mask token {model.mask_token_id} "
        f"({'added' if model.mask_token_added else 'reused'})")
    if causal_lm:
        return save_causal_lm(model, out, progress=say)
    return model.save_pretrained(out, progress=say)


def _progress(line: str) -> None:
    print(f"[dlm export] {line}", file=sys.stderr, flush=True)


def export_checkpoint(ckpt: str, out: str, dtype: Literal["keep", "float32", "bfloat16"] = "keep",
                      causal_lm: bool = False, trust_checkpoint: bool = False) -> None:
    """Export a lightning_dlm checkpoint as a Hugging Face folder (safetensors weights, config,
    tokenizer with the mask token, diffusion_config.json).

    Args:
        ckpt: a .ckpt file or a sharded checkpoint folder written by `dlm fit`.
        out: the folder to write (must not exist, or be empty).
        dtype: dtype of the exported weights: keep (the checkpoint's), float32 or bfloat16.
        causal_lm: write the model of an AR run (model.objective: ar) as a plain transformers causal
            LM folder (no diffusion_config.json), a pretrained model for model.backbone.pretrained.
        trust_checkpoint: unpickle the checkpoint in full, which runs any code in it: only for a file
            whose author you trust (by default only tensors and plain data are read).
    """
    export(ckpt, out, dtype=dtype, progress=_progress, trust_checkpoint=trust_checkpoint, causal_lm=causal_lm)


def export_command(args: List[str]) -> None:
    parser = ArgumentParser(prog="dlm export", description="Export a lightning_dlm checkpoint as a Hugging Face folder.")
    parser.add_function_arguments(export_checkpoint, as_group=False, skip={"trust_checkpoint"})
    parser.add_argument("--trust_checkpoint", action=ActionYesNo, default=False, help=TRUST_HELP)
    cfg = parser.parse_args(args)
    export_checkpoint(**cfg.as_dict())
