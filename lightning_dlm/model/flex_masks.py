"""FlexAttention: the diffusion attention pattern as a ``BlockMask`` (nothing L x L on the GPU).

With ``attn_implementation: flex_attention`` transformers 5.x runs the attention through its own
integration (``transformers.integrations.flex_attention``: ``flex_attention`` compiled once with
``torch.compile``), and a 4-D ``BlockMask`` passed as ``attention_mask`` reaches that kernel
unchanged (``masking_utils`` returns prepared 4-D masks as they are). This module builds that
``BlockMask`` from one ``mask_mod``:

    (annealing mask AND key is not padding AND same document) OR query == key

which is the pattern :func:`lightning_dlm.core.annealing.attention_allowed` gives the dense
(SDPA / eager) paths. The annealing part is the seeded hash of
:class:`~lightning_dlm.core.annealing.AnnealMask`, evaluated per (q, k) inside the kernel.

On CUDA the block mask is built by a compiled ``create_block_mask`` (the mask is never
materialised); the mask_mod closes over tensors and plain functions only, so neither it nor the
compiled attention recompiles when the seed or the ratio changes from step to step. On the CPU
``create_block_mask`` runs eagerly (it materialises (B, 1, L, L) booleans, fine for checks), and
PyTorch's FlexAttention is forward-only there: it has no CPU backward.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from lightning_dlm.core.annealing import AnnealMask, MaskMod
from lightning_dlm.core.errors import DLMError

FLEX = "flex_attention"
# Attention-dropout keys of model configs; transformers' FlexAttention refuses dropout in training.
_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop")

_compiled_create_block_mask = None


def _flex():
    """torch's FlexAttention module (imported on first use: the other attention paths never need it)."""
    import torch.nn.attention.flex_attention as flex

    return flex


def _dense_mod(allowed: torch.Tensor) -> MaskMod:
    """A dense boolean pattern (L, L) or (B, L, L) given by the caller (e.g. a causal mask)."""
    if allowed.dim() == 2:
        return lambda b, h, q, k: allowed[q, k]
    return lambda b, h, q, k: allowed[b, q, k]


def _key_padding_mod(padding_mask: torch.Tensor) -> MaskMod:
    return lambda b, h, q, k: padding_mask[b, k]


def _same_document_mod(document_ids: torch.Tensor) -> MaskMod:
    return lambda b, h, q, k: document_ids[b, q] == document_ids[b, k]


def _diagonal(b, h, q, k):
    return q == k


def flex_mask_mod(
    length: int,
    allowed: Union[AnnealMask, torch.Tensor, None] = None,
    padding_mask: Optional[torch.Tensor] = None,
    document_ids: Optional[torch.Tensor] = None,
    device=None,
) -> MaskMod:
    """The ``mask_mod(b, h, q_idx, kv_idx)`` of the diffusion attention pattern.

    ``allowed``: an :class:`AnnealMask` (evaluated per (q, k)), a dense boolean (L, L) / (B, L, L)
    pattern, or None (everything); ``padding_mask`` (B, L), 1 for real tokens; ``document_ids``
    (B, L), attention stays within equal ids. The diagonal is always open.
    """
    flex = _flex()
    parts = []
    if isinstance(allowed, AnnealMask):
        parts.append(allowed.mask_mod(length, device))
    elif allowed is not None:
        parts.append(_dense_mod(allowed.to(device=device, dtype=torch.bool)))
    if padding_mask is not None:
        parts.append(_key_padding_mod(padding_mask.to(device=device, dtype=torch.bool)))
    if document_ids is not None:
        parts.append(_same_document_mod(document_ids.to(device)))
    return flex.or_masks(flex.and_masks(*parts), _diagonal)


def _per_row(allowed, padding_mask, document_ids) -> bool:
    dense_batched = isinstance(allowed, torch.Tensor) and allowed.dim() == 3
    return dense_batched or padding_mask is not None or document_ids is not None


def flex_block_mask(
    batch_size: int,
    length: int,
    allowed: Union[AnnealMask, torch.Tensor, None] = None,
    padding_mask: Optional[torch.Tensor] = None,
    document_ids: Optional[torch.Tensor] = None,
    device=None,
    block_size: int = 128,
):
    """The ``BlockMask`` of :func:`flex_mask_mod` for a (batch_size, length) batch.

    Its batch dimension is 1 (broadcast) when nothing in it depends on the row.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    mask_mod = flex_mask_mod(length, allowed, padding_mask, document_ids, device)
    rows = batch_size if _per_row(allowed, padding_mask, document_ids) else 1
    return block_mask_from_mod(mask_mod, rows, length, length, device, block_size)


def block_mask_from_mod(mask_mod: MaskMod, rows: int, q_len: int, kv_len: int, device=None, block_size: int = 128):
    """The ``BlockMask`` of any ``mask_mod`` (e.g. block diffusion's 2L pattern,
    :func:`lightning_dlm.core.blocks.block_mask_mod`); compiled ``create_block_mask`` on CUDA."""
    global _compiled_create_block_mask
    flex = _flex()
    device = torch.device(device) if device is not None else torch.device("cpu")
    create = flex.create_block_mask
    if device.type == "cuda":
        if _compiled_create_block_mask is None:
            _compiled_create_block_mask = torch.compile(flex.create_block_mask)
        create = _compiled_create_block_mask
    return create(mask_mod, rows, None, q_len, kv_len, device=device, BLOCK_SIZE=block_size)


def block_counts(block_mask, row: int = 0) -> Dict[str, int]:
    """How a ``BlockMask`` splits the (query block, key block) grid of batch row ``row`` (head 0):
    ``full`` blocks run without evaluating the mask_mod, ``partial`` ones evaluate it on every
    score, ``empty`` ones are skipped. ``create_block_mask`` decides each block from the mask_mod
    itself, so a mask whose blocks are all-open or all-closed (``right_context``, causal,
    bidirectional) is skipped or run unmasked there without anything else to do; the ``random``
    annealing mask leaves every block on or above the diagonal partial."""
    partial = int(block_mask.kv_num_blocks[row, 0].sum())
    full = int(block_mask.full_kv_num_blocks[row, 0].sum()) if block_mask.full_kv_num_blocks is not None else 0
    q_blocks, kv_blocks = block_mask.kv_num_blocks.shape[-1], block_mask.kv_indices.shape[-1]
    total = q_blocks * kv_blocks
    return dict(full=full, partial=partial, empty=total - full - partial, total=total)


def check_flex_support(model_class: Optional[type], model_config) -> None:
    """Fail early, in one line, where transformers / torch cannot run this model with FlexAttention."""
    from transformers.utils import is_torch_flex_attn_available

    if not is_torch_flex_attn_available():
        raise DLMError(
            f"attn_implementation flex_attention needs torch >= 2.5 with FlexAttention (found {torch.__version__}): "
            f"upgrade torch, or use attn_implementation: sdpa"
        )
    # the per-family class flag transformers' own check reads: transformers has no public query for a
    # class (only for a built model), and this runs before anything is built or downloaded
    if model_class is not None and not getattr(model_class, "_supports_flex_attn", False):
        import transformers

        raise DLMError(
            f"{model_class.__name__} ({model_config.model_type}) has no FlexAttention support in transformers "
            f"{transformers.__version__}: use attn_implementation: sdpa (it anneals through the dense mask)"
        )


def check_flex_call(model, device: torch.device) -> None:
    """Refuse, in one line, the FlexAttention calls PyTorch / transformers would fail deep inside."""
    if model.training:
        for key in _DROPOUT_KEYS:
            if float(getattr(model.config, key, 0.0) or 0.0) > 0.0:
                raise DLMError(
                    f"FlexAttention takes no attention dropout, but the model has {key}={getattr(model.config, key)}: "
                    f"set backbone.config.{key}: 0.0, or use attn_implementation: sdpa"
                )
    if device.type == "cpu" and torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        raise DLMError(
            f"PyTorch's FlexAttention has no backward pass on the CPU (torch {torch.__version__}): train on CUDA, "
            f"use attn_implementation: sdpa on the CPU, or run the forward under torch.no_grad()"
        )
