"""The decoding canvas: fixed prefix and suffix tokens around a masked target region.

Rows of a batch are left-padded to a common width (padding is never attended, and positions
skip it), so a prompt decodes the same in a batch as alone. With ``align_targets`` the suffixes
are right-padded as well, so every row's target region occupies the same columns (the layout the
block sampler and its KV caches need). With the shift, the slot at
position i is predicted from the logits at i-1, which is why a row's first token must be real:
an empty prompt starts with the BOS (or EOS) token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from lightning_dlm.core.errors import DLMError


@dataclass
class Canvas:
    ids: torch.Tensor  # (B, W) token ids; masked slots hold the mask id
    masked: torch.Tensor  # (B, W) bool, slots still to decode
    target: torch.Tensor  # (B, W) bool, the slots of the generated region
    attention_mask: Optional[torch.Tensor]  # (B, W) 1 = real token, None when no row is padded

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    def target_span(self) -> Tuple[int, int]:
        """(start, end) columns of the target region, when every row has it in the same columns."""
        cols = self.target.any(0).nonzero().flatten()
        start, end = int(cols[0]), int(cols[-1]) + 1
        if not bool(self.target[:, start:end].all()):
            raise DLMError("the rows' target regions are not aligned: build the canvas with align_targets=True")
        return start, end


def build_canvas(
    prefixes: Sequence[Sequence[int]],
    length: int,
    mask_id: int,
    pad_id: int,
    start_id: Optional[int],
    suffixes: Optional[Sequence[Sequence[int]]] = None,
    max_positions: Optional[int] = None,
    device=None,
    align_targets: bool = False,
) -> Canvas:
    """Lay out ``[pad...] prefix [mask x length] suffix`` rows (``... suffix [pad...]`` when aligned)."""
    if length < 1:
        raise DLMError(f"the target length must be >= 1, got {length}")
    suffixes = suffixes or [[] for _ in prefixes]
    if len(suffixes) != len(prefixes):
        raise DLMError(f"got {len(prefixes)} prompts but {len(suffixes)} suffixes: give one suffix per prompt")
    if align_targets:
        return _aligned_canvas(prefixes, suffixes, length, mask_id, pad_id, start_id, max_positions, device)
    rows: List[List[int]] = []
    targets: List[List[bool]] = []
    for prefix, suffix in zip(prefixes, suffixes):
        prefix = _start(prefix, start_id)
        rows.append(prefix + [mask_id] * length + list(suffix))
        targets.append([False] * len(prefix) + [True] * length + [False] * len(suffix))
    width = max(len(r) for r in rows)
    _check_width(width, max_positions)
    pad = [width - len(r) for r in rows]
    ids = torch.tensor([[pad_id] * p + r for p, r in zip(pad, rows)], dtype=torch.long, device=device)
    target = torch.tensor([[False] * p + m for p, m in zip(pad, targets)], dtype=torch.bool, device=device)
    attention = None
    if any(pad):
        attention = torch.tensor([[0] * p + [1] * len(r) for p, r in zip(pad, rows)], dtype=torch.long, device=device)
    return Canvas(ids=ids, masked=target.clone(), target=target, attention_mask=attention)


def _start(prefix: Sequence[int], start_id: Optional[int]) -> List[int]:
    prefix = list(prefix)
    if not prefix:
        if start_id is None:
            raise DLMError("an empty prompt needs a BOS or EOS token to start from: give a prompt")
        prefix = [start_id]
    return prefix


def _check_width(width: int, max_positions: Optional[int]) -> None:
    if max_positions is not None and width > max_positions:
        raise DLMError(
            f"prompt + target + suffix is {width} tokens, above the model's limit of {max_positions}: "
            f"shorten the prompt/suffix or the length"
        )


def _aligned_canvas(prefixes, suffixes, length, mask_id, pad_id, start_id, max_positions, device) -> Canvas:
    prefixes = [_start(p, start_id) for p in prefixes]
    suffixes = [list(s) for s in suffixes]
    width_p, width_s = max(len(p) for p in prefixes), max(len(s) for s in suffixes)
    # the longest row decides: rows are [pad] prefix target suffix [pad], all of the same width
    longest = max(len(p) + length + len(s) for p, s in zip(prefixes, suffixes))
    _check_width(longest, max_positions)
    ids, real = [], []
    for p, s in zip(prefixes, suffixes):
        lp, rp = width_p - len(p), width_s - len(s)
        ids.append([pad_id] * lp + p + [mask_id] * length + s + [pad_id] * rp)
        real.append([0] * lp + [1] * (len(p) + length + len(s)) + [0] * rp)
    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
    target = torch.zeros_like(ids_t, dtype=torch.bool)
    target[:, width_p:width_p + length] = True
    attention = torch.tensor(real, dtype=torch.long, device=device)
    attention = None if bool(attention.all()) else attention
    return Canvas(ids=ids_t, masked=target.clone(), target=target, attention_mask=attention)


def slot_logits(logits: torch.Tensor, shift: bool) -> torch.Tensor:
    """Logits aligned to slots: with the shift, slot i reads logits[:, i-1] (slot 0 is never decoded)."""
    if not shift:
        return logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def slot_logit_positions(start: int, end: int, shift: bool) -> Tuple[int, int]:
    """The logit positions that predict slots ``[start, end)``: one to the left with the shift."""
    if shift:
        if start < 1:
            raise DLMError("with the shift, slot 0 has no logits: the first column must be a real token")
        return start - 1, end - 1
    return start, end
