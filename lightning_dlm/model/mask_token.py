"""Provide the absorbing [MASK] token: add a new vocabulary entry or reuse an existing id.

The mask-token rule (``mask_token.mode: auto``, the default; :func:`provide_mask_token`):

1. ``mask_token.id`` given: that id; else ``mask_token.token`` if the vocabulary holds it (an
   exported diffusion LM's own mask, Dream's ``<|mask|>``);
2. else the tokenizer's own unused token, if it has one (:func:`reserved_mask_token`): its declared
   mask token, a token named as a mask (Gemma's ``<mask>``, BERT's ``[MASK]``), else the lowest
   reserved / unused one (Llama-3's ``<|reserved_special_token_N|>``, Gemma's ``<unusedN>``, Qwen-1's
   ``<|extra_N|>``). Reusing it costs no new embedding row, and no text the model was trained on
   used it;
3. else ``mask_token.token`` is added (GPT-2, SmolLM2, Qwen2.5 / Qwen3, whose tokenizers reserve
   nothing; Qwen's embedding matrices have spare rows past the tokenizer, so the added token takes
   one of those and nothing is resized).

A token only qualifies in step 2 if ordinary text cannot produce it: it must be one of the
tokenizer's added tokens (matched whole before the model splits text, so text tokenizes to it only
where its literal string is written), not one of its regular vocabulary entries (which the model
emits for ordinary text, whatever the entry is called); not a token the tokenizer uses (bos, eos,
pad, unk, sep, cls, its listed extra special tokens, or one its chat template writes); and inside
the embedding matrix.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

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


def _tokenizer_name(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") if tokenizer is not None else ""
    return f" of the tokenizer '{name}'" if name else ""


def reuse_mask_token(model: PreTrainedModel, tokenizer, cfg: MaskTokenConfig) -> int:
    """Use an existing id (by ``cfg.id`` or by looking up ``cfg.token``) as the mask."""
    rows = _vocab_rows(model)
    mask_id: Optional[int] = cfg.id
    if mask_id is None:
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        if cfg.token not in vocab:
            raise DLMError(
                f"mask token '{cfg.token}' is not in the vocabulary{_tokenizer_name(tokenizer)}: give a token it "
                f"holds (or mask_token.id), or use mask_token.mode: add (or auto, the default)"
            )
        mask_id = vocab[cfg.token]
    if not 0 <= mask_id < rows:
        raise DLMError(
            f"mask token id {mask_id} is outside the vocabulary (size {rows}): pick an id in [0, {rows}) "
            f"or use mask_token.mode: add"
        )
    return int(mask_id)


#: names of tokens that are masks (compared without ``< > | [ ]`` and case): ``<mask>``, ``[MASK]``, ``<|mask|>``
MASK_NAMES = re.compile(r"(\w+_)?mask")
#: names of reserved / unused tokens: ``<|reserved_special_token_3|>``, ``<unused12>``, ``[unused1]``, ``<|extra_0|>``
RESERVED_NAMES = re.compile(r"(reserved|unused|extra)(_?[a-z]+)*_?(\d+)")


def _bare(content: str) -> str:
    return content.strip("<>|[] ").lower()


def _used_tokens(tokenizer) -> set:
    """The tokens the tokenizer itself uses: its named special tokens (bos, eos, pad, ...; not the
    mask), its listed extra special tokens, and any token its chat template writes."""
    used = {getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token",
                                                          "sep_token", "cls_token")}
    extra = getattr(tokenizer, "extra_special_tokens", None) or []  # a list, or names -> tokens
    used |= set(extra.values() if isinstance(extra, dict) else extra)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(str(t) for t in template.values())
    if template:
        used |= {t.content for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
                 if t.content in template}
    return {str(t) for t in used if t}


def reserved_mask_token(tokenizer, rows: Optional[int] = None) -> Optional[Tuple[int, str]]:
    """``(id, token)`` of the tokenizer's own unused token the mask can reuse (see the module
    docstring), or None: its declared mask token, else a token named as a mask, else the lowest-id
    reserved / unused token; only added tokens that the tokenizer does not use, below ``rows``."""
    if tokenizer is None:
        return None
    added: Dict[int, str] = {int(i): t.content for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    used = _used_tokens(tokenizer)

    def usable(token_id: int, content: str) -> bool:
        return content not in used and (rows is None or 0 <= token_id < rows)

    declared = getattr(tokenizer, "mask_token", None)
    candidates: List[Tuple[int, int, str]] = []  # (rank, id, token)
    for token_id, content in added.items():
        if not usable(token_id, content):
            continue
        if declared is not None and content == str(declared):
            candidates.append((0, token_id, content))
        elif MASK_NAMES.fullmatch(_bare(content)):
            candidates.append((1, token_id, content))
        elif RESERVED_NAMES.fullmatch(_bare(content)):
            candidates.append((2, token_id, content))
    if not candidates:
        return None
    _, token_id, content = min(candidates)
    return token_id, content


def provide_mask_token(model: PreTrainedModel, tokenizer, cfg: MaskTokenConfig, seed: int = 0) -> Tuple[int, bool]:
    """Return ``(mask_id, added)`` after applying ``cfg`` to the model and tokenizer (``mode: auto``:
    the mask-token rule of the module docstring)."""
    if cfg.mode == "auto":
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        if cfg.id is not None or cfg.token in vocab:
            return reuse_mask_token(model, tokenizer, cfg), False
        reserved = reserved_mask_token(tokenizer, _vocab_rows(model))
        if reserved is not None:
            return reuse_mask_token(model, tokenizer, MaskTokenConfig(mode="reuse", id=reserved[0])), False
        if tokenizer is None:
            raise DLMError("mask_token.mode: auto needs a tokenizer (to find or add the mask token): set "
                           "backbone.tokenizer, or give mask_token.id")
        return add_mask_token(model, tokenizer, cfg, seed), True
    if cfg.mode == "add":
        if tokenizer is None:
            raise DLMError("mask_token.mode: add needs a tokenizer: set backbone.tokenizer")
        return add_mask_token(model, tokenizer, cfg, seed), True
    if cfg.mode == "reuse":
        return reuse_mask_token(model, tokenizer, cfg), False
    raise DLMError(f"unknown mask_token.mode '{cfg.mode}': choose auto, add or reuse")
