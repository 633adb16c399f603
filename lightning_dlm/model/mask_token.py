"""Provide the absorbing [MASK] token: add a new vocabulary entry or reuse an existing id."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from transformers import PreTrainedModel

from lightning_dlm.core.errors import DLMError
from lightning_dlm.model.config import MaskTokenConfig


def _vocab_rows(model: PreTrainedModel) -> int:
    return model.get_input_embeddings().weight.shape[0]


@torch.no_grad()
def _init_row_at_mean(weight: torch.Tensor, row: int, old_rows: int, noise_std: float, generator) -> None:
    if weight.is_meta:  # an empty (sharded-load) model: the row arrives with the loaded weights
        return
    mean = weight[:old_rows].float().mean(dim=0)
    if noise_std > 0:
        mean = mean + noise_std * torch.randn(mean.shape, generator=generator, device=mean.device)
    weight[row] = mean.to(weight.dtype)


def add_mask_token(model: PreTrainedModel, tokenizer, cfg: MaskTokenConfig, seed: int = 0) -> int:
    """Add ``cfg.token`` as the tokenizer's mask token; initialise its embedding at the mean row."""
    if cfg.token in tokenizer.get_vocab():
        raise DLMError(
            f"mask token '{cfg.token}' is already in the vocabulary: use mask_token.mode: reuse, "
            f"or pick another mask_token.token to add"
        )
    tokenizer.add_special_tokens({"mask_token": cfg.token})
    mask_id = tokenizer.convert_tokens_to_ids(cfg.token)
    old_rows = _vocab_rows(model)
    if mask_id >= old_rows:
        model.resize_token_embeddings(mask_id + 1, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    rows = min(old_rows, mask_id) if mask_id < old_rows else old_rows
    _init_row_at_mean(model.get_input_embeddings().weight, mask_id, rows, cfg.init_noise_std, generator)
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        _init_row_at_mean(output.weight, mask_id, rows, 0.0, generator)
        if getattr(output, "bias", None) is not None:
            with torch.no_grad():
                if not output.bias.is_meta:
                    output.bias[mask_id] = output.bias[:rows].mean()
    return mask_id


def reuse_mask_token(model: PreTrainedModel, tokenizer, cfg: MaskTokenConfig) -> int:
    """Use an existing id (by ``cfg.id`` or by looking up ``cfg.token``) as the mask."""
    rows = _vocab_rows(model)
    mask_id: Optional[int] = cfg.id
    if mask_id is None:
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        if cfg.token not in vocab:
            raise DLMError(
                f"mask token '{cfg.token}' is not in the vocabulary: give mask_token.id, or use mask_token.mode: add"
            )
        mask_id = vocab[cfg.token]
    if not 0 <= mask_id < rows:
        raise DLMError(
            f"mask token id {mask_id} is outside the vocabulary (size {rows}): pick an id in [0, {rows}) "
            f"or use mask_token.mode: add"
        )
    return int(mask_id)


def provide_mask_token(model: PreTrainedModel, tokenizer, cfg: MaskTokenConfig, seed: int = 0) -> Tuple[int, bool]:
    """Return ``(mask_id, added)`` after applying ``cfg`` to the model and tokenizer."""
    if cfg.mode == "add":
        if tokenizer is None:
            raise DLMError("mask_token.mode: add needs a tokenizer: set backbone.tokenizer")
        return add_mask_token(model, tokenizer, cfg, seed), True
    if cfg.mode == "reuse":
        return reuse_mask_token(model, tokenizer, cfg), False
    raise DLMError(f"unknown mask_token.mode '{cfg.mode}': choose add or reuse")
