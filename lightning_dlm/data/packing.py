"""Tokenize documents and pack them into fixed-length blocks.

Packed pretraining (the DiffuGPT / DiffuLLaMA recipe): every document is tokenized without
special tokens, followed by EOS (and preceded by BOS when asked), the documents are concatenated
into one token stream and that stream is cut into blocks of exactly ``seq_len`` tokens. There is
no padding; a block may span several documents and a document several blocks.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from lightning_dlm.core.errors import DLMError, require


def load_tokenizer(tokenizer: object):
    """The data's tokenizer: a path or hub name (loaded like the model's), or an object as is."""
    if tokenizer is None:
        raise DLMError("no tokenizer is set for the data; set data.tokenizer (a tokenizer directory or hub name)")
    if not isinstance(tokenizer, (str, bytes)) and not hasattr(tokenizer, "__fspath__"):
        return tokenizer  # already a tokenizer object (notebooks, tests)
    from lightning_dlm.model.loading import load_tokenizer as load_named_tokenizer

    return load_named_tokenizer(str(tokenizer))


class DocumentEncoder:
    """Turns a batch of document texts into token arrays, each followed by EOS (and led by BOS).

    Text is tokenized with ``add_special_tokens=False`` and ``split_special_tokens=True``: a
    literal ``<|endoftext|>`` (or mask token) inside a document is text, never a control token.
    The tokenizer's "sequence longer than model_max_length" warning is silenced: documents are
    meant to be longer than the context, packing cuts them.
    """

    def __init__(self, tokenizer, add_bos: bool = False, add_eos: bool = True):
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.add_eos = add_eos
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        self.eos_id: Optional[int] = getattr(tokenizer, "eos_token_id", None)
        self.bos_id: Optional[int] = getattr(tokenizer, "bos_token_id", None)
        require(
            not add_eos or self.eos_id is not None,
            f"tokenizer '{name}' has no eos token, which packing appends to every document; "
            f"use a tokenizer with eos_token set (or set data.add_eos: false)",
        )
        require(
            not add_bos or self.bos_id is not None,
            f"tokenizer '{name}' has no bos token but data.add_bos is true; set data.add_bos: false or use a tokenizer with bos_token",
        )
        deprecation_warnings = getattr(tokenizer, "deprecation_warnings", None)
        if isinstance(deprecation_warnings, dict):  # belt and braces next to verbose=False below
            deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        encoded = self.tokenizer(
            list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False
        )["input_ids"]
        prefix = [self.bos_id] if self.add_bos else []
        suffix = [self.eos_id] if self.add_eos else []
        return [np.asarray(prefix + ids + suffix, dtype=np.int64) for ids in encoded]


def pack_blocks(
    documents: Iterable[Union[np.ndarray, Sequence[int]]], seq_len: int, document_ids: bool = False
) -> Iterator[Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]]:
    """Concatenate token arrays and cut the stream into blocks of exactly ``seq_len`` tokens.

    Lazy and linear in the number of tokens. The last ``len(stream) % seq_len`` tokens (the tail)
    are dropped when ``documents`` ends; for an infinite document stream nothing is dropped.

    With ``document_ids=True`` it yields ``(block, ids)`` pairs instead: ``ids[i]`` numbers the
    document token ``i`` comes from, 0 for the first document of the block, +1 at each document
    start (for attention kept within documents: ``DiffusionModel(..., document_ids=...)``).
    """
    require(seq_len >= 1, f"seq_len must be >= 1 (got {seq_len})")
    buffer = np.empty(0, dtype=np.int64)
    owners = np.empty(0, dtype=np.int64)  # running document number of each buffered token
    count = 0
    for doc in documents:
        doc = np.asarray(doc, dtype=np.int64)
        buffer = np.concatenate([buffer, doc]) if len(buffer) else doc
        if document_ids and len(doc):
            owners = np.concatenate([owners, np.full(len(doc), count, dtype=np.int64)])
            count += 1
        full = len(buffer) // seq_len
        for i in range(full):
            block = buffer[i * seq_len : (i + 1) * seq_len]
            if document_ids:
                ids = owners[i * seq_len : (i + 1) * seq_len]
                yield block, ids - ids[0]
            else:
                yield block
        buffer = buffer[full * seq_len :]
        owners = owners[full * seq_len :]
