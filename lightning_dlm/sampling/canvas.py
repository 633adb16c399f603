"""The decoding canvas: fixed prefix and suffix tokens around a masked target region.

Rows of a batch are left-padded to a common width (padding is never attended, and positions
skip it), so a prompt decodes the same in a batch as alone. With the shift, the slot at
position i is predicted from the logits at i-1, which is why a row's first token must be real:
an empty prompt starts with the BOS (or EOS) token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from lightning_dlm.errors import DLMError


@dataclass
class Canvas:
    ids: torch.Tensor  # (B, W) token ids; masked slots hold the mask id
    masked: torch.Tensor  # (B, W) bool, slots still to decode
    target: torch.Tensor  # (B, W) bool, the slots of the generated region
    attention_mask: Optional[torch.Tensor]  # (B, W) 1 = real token, None when no row is padded

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]


def build_canvas(
    prefixes: Sequence[Sequence[int]],
    length: int,
    mask_id: int,
    pad_id: int,
    start_id: Optional[int],
    suffixes: Optional[Sequence[Sequence[int]]] = None,
    max_positions: Optional[int] = None,
    device=None,
) -> Canvas:
    """Lay out ``[pad...] prefix [mask x length] suffix`` rows."""
    if length < 1:
        raise DLMError(f"the target length must be >= 1, got {length}")
    suffixes = suffixes or [[] for _ in prefixes]
    if len(suffixes) != len(prefixes):
        raise DLMError(f"got {len(prefixes)} prompts but {len(suffixes)} suffixes: give one suffix per prompt")
    rows: List[List[int]] = []
    targets: List[List[bool]] = []
    for prefix, suffix in zip(prefixes, suffixes):
        prefix = list(prefix)
        if not prefix:
            if start_id is None:
                raise DLMError("an empty prompt needs a BOS or EOS token to start from: give a prompt")
            prefix = [start_id]
        rows.append(prefix + [mask_id] * length + list(suffix))
        targets.append([False] * len(prefix) + [True] * length + [False] * len(suffix))
    width = max(len(r) for r in rows)
    if max_positions is not None and width > max_positions:
        raise DLMError(
            f"prompt + target + suffix is {width} tokens, above the model's limit of {max_positions}: "
            f"shorten the prompt/suffix or the length"
        )
    pad = [width - len(r) for r in rows]
    ids = torch.tensor([[pad_id] * p + r for p, r in zip(pad, rows)], dtype=torch.long, device=device)
    target = torch.tensor([[False] * p + m for p, m in zip(pad, targets)], dtype=torch.bool, device=device)
    attention = None
    if any(pad):
        attention = torch.tensor([[0] * p + [1] * len(r) for p, r in zip(pad, rows)], dtype=torch.long, device=device)
    return Canvas(ids=ids, masked=target.clone(), target=target, attention_mask=attention)


def slot_logits(logits: torch.Tensor, shift: bool) -> torch.Tensor:
    """Logits aligned to slots: with the shift, slot i reads logits[:, i-1] (slot 0 is never decoded)."""
    if not shift:
        return logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
