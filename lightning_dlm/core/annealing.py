"""Causal-to-bidirectional attention annealing.

For the first ``anneal_steps`` optimiser steps the attention is causal plus a growing share of the
future, ``ratio(step) = min(1, (step + 1) / anneal_steps)``; afterwards it is fully bidirectional
and no mask is built at all (so the fast attention kernels are used).

An annealing mask is a pure function of a seed: whether query ``q`` may see the future key ``k``
is decided by a 32-bit integer hash of ``(seed, q, k)`` compared with ``ratio * 2**32``. The one
definition (:meth:`AnnealMask.allowed`) is evaluated two ways:

* on the (L, L) grid, :meth:`AnnealMask.dense`, for the dense-mask attention paths (SDPA, eager),
  turned into the additive float form transformers expects by :func:`additive_attention_mask`
  (a 4-D boolean mask would be added as a 0/1 bias by the eager attention of transformers 5.x);
* per (q, k) inside an attention kernel, :meth:`AnnealMask.mask_mod` (the FlexAttention
  ``mask_mod`` signature), with nothing L x L stored: the seed and the threshold are 0-d tensors
  and the hash is integer tensor arithmetic that traces and compiles.

Masks are boolean ``allowed[q, k]`` (True = query q may attend key k).
"""

from __future__ import annotations

from typing import Callable, ClassVar, Dict, Optional, Tuple

import torch

from lightning_dlm.core.errors import DLMError

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31 of a good 32-bit mixer (C. Wellons' "lowbias32" search): a 32-bit
# value times one of them stays below 2**63, so the arithmetic is exact in int64 on every backend.
_MIX_A, _MIX_B = 0x21F0AAAD, 0x735A2D97
_TWO32 = 1 << 32
# Rows of the hash grid evaluated at once when counting a right-context reach (bounds memory).
_REACH_CHUNK = 1 << 22


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """Share of the future opened at optimiser step ``step``; 1.0 means fully bidirectional."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / anneal_steps)


def causal_allowed(length: int, device=None) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit integers with good avalanche; int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MIX_A) & _M32
    x = x ^ (x >> 15)
    x = (x * _MIX_B) & _M32
    return x ^ (x >> 15)


def pair_hash(seed_lo: torch.Tensor, seed_hi: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Uniform 32-bit hash of (seed, q, k); broadcasts. For a fixed (seed, q), k -> hash is a bijection."""
    return mix32(mix32(mix32(seed_lo ^ q) ^ seed_hi) ^ k)


class AnnealMask:
    """Causal attention plus a seeded share ``ratio`` of the future (base of the annealing masks).

    ``seed`` is any non-negative integer (e.g. :func:`lightning_dlm.core.seeding.derive_seed` of
    (seed, batch counter, rank)); the mask is a pure function of (ratio, seed). One mask is shared
    by the batch, the heads and the layers. Subclasses define :meth:`allowed`.
    """

    name: ClassVar[str]

    def __init__(self, ratio: float, seed: int):
        if not 0.0 <= float(ratio) <= 1.0:
            raise DLMError(f"annealing ratio must be in [0, 1], got {ratio}")
        if int(seed) < 0:
            raise DLMError(f"annealing seed must be >= 0, got {seed}")
        self.ratio = float(ratio)
        self.seed = int(seed)
        # Each future pair is opened with probability threshold / 2**32 (ratio to within 2**-33).
        self.threshold = min(_TWO32, round(self.ratio * _TWO32))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, seed={self.seed})"

    def _constants(self, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(seed low 32 bits, seed high 32 bits, threshold) as 0-d int64 tensors on ``device``."""
        seed = self.seed & ((1 << 64) - 1)
        as_tensor = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
        return as_tensor(seed & _M32), as_tensor(seed >> 32), as_tensor(self.threshold)

    @staticmethod
    def _opened(constants, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Whether the pair (q, k) is drawn open: hash < threshold (probability ``ratio``)."""
        seed_lo, seed_hi, threshold = constants
        return pair_hash(seed_lo, seed_hi, q.to(torch.int64), k.to(torch.int64)) < threshold

    def prepare(self, length: int, device=None) -> tuple:
        """The tensors :meth:`allowed` reads (O(1) or O(L) of them, never L x L)."""
        return self._constants(device)

    @staticmethod
    def allowed(state: tuple, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``allowed[q, k]`` for index tensors q and k (any broadcastable shapes), from the
        tensors of :meth:`prepare` only (a plain function: a compiled kernel sees no object)."""
        raise NotImplementedError

    def dense(self, length: int, device=None) -> torch.Tensor:
        """The (L, L) boolean matrix (for the dense-mask attention paths)."""
        idx = torch.arange(length, device=device)
        return self.allowed(self.prepare(length, device), idx[:, None], idx[None, :])

    def mask_mod(self, length: int, device=None) -> MaskMod:
        """``mask_mod(batch, head, q_idx, kv_idx)`` for FlexAttention, the same mask per (q, k).

        It closes over 0-d / (L,) tensors and a plain function only, so a compiled kernel is
        reused from step to step (a new seed or ratio is new tensor data, not a recompile)."""
        state = self.prepare(length, device)
        allowed = type(self).allowed

        def anneal_mask_mod(batch, head, q_idx, kv_idx):
            return allowed(state, q_idx, kv_idx)

        return anneal_mask_mod


class RandomAnnealMask(AnnealMask):
    """The reference mask: causal plus each future (query, key) pair opened independently with
    probability ``ratio``."""

    name = "random"

    @staticmethod
    def allowed(state, q, k):
        return (k <= q) | AnnealMask._opened(state, q, k)


class RightContextAnnealMask(AnnealMask):
    """Structured variant: query i sees the keys j <= i + r_i, a contiguous right context.

    r_i is the number of future pairs (i, j > i) the random mask of the same (ratio, seed) opens:
    Binomial(L - 1 - i, ratio), the same count as the random mask, but contiguous, so
    block-sparse kernels skip whole blocks. Stored as one reach vector of L integers.
    """

    name = "right_context"

    def prepare(self, length, device=None):
        constants = self._constants(device)
        return constants + (self.reach(length, device, constants),)

    def reach(self, length: int, device=None, constants=None) -> torch.Tensor:
        """(L,) int64: the last key each query sees, i + r_i (rows counted in chunks)."""
        constants = constants if constants is not None else self._constants(device)
        keys = torch.arange(length, device=device)
        reach = torch.empty(length, dtype=torch.int64, device=device)
        rows = max(1, _REACH_CHUNK // max(length, 1))
        for start in range(0, length, rows):
            q = keys[start : start + rows, None]
            future = (keys[None, :] > q) & self._opened(constants, q, keys[None, :])
            reach[start : start + rows] = q[:, 0] + future.sum(dim=1)
        return reach

    @staticmethod
    def allowed(state, q, k):
        reach = state[3]
        return k <= reach[q]


ANNEAL_MASKS: Dict[str, type] = {cls.name: cls for cls in (RandomAnnealMask, RightContextAnnealMask)}


def annealing_mask(kind: str, ratio: float, seed: int) -> Optional[AnnealMask]:
    """The annealing mask of ``kind`` at ``ratio``, or None once annealing is over (bidirectional)."""
    if kind not in ANNEAL_MASKS:
        raise DLMError(f"unknown annealing mask '{kind}': choose one of {sorted(ANNEAL_MASKS)}")
    if ratio >= 1.0:
        return None
    return ANNEAL_MASKS[kind](ratio, seed)


def annealing_allowed(
    length: int,
    ratio: float,
    kind: str = "random",
    generator: Optional[torch.Generator] = None,
    device=None,
) -> Optional[torch.Tensor]:
    """The dense (L, L) allowed matrix for ``ratio``, or None once annealing is over.

    Convenience over :func:`annealing_mask`: the seed is one 63-bit draw from ``generator`` (the
    global generator when None).
    """
    draw_on = generator.device if generator is not None else None
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=draw_on).item())
    mask = annealing_mask(kind, ratio, seed)
    return None if mask is None else mask.dense(length, device)


def attention_allowed(
    allowed: Optional[torch.Tensor],
    padding_mask: Optional[torch.Tensor] = None,
    document_ids: Optional[torch.Tensor] = None,
    length: Optional[int] = None,
) -> torch.Tensor:
    """The full boolean pattern (B or 1, L, L): ``allowed`` (None = everything), keys that are
    padding (``padding_mask`` (B, L), 0 = padding) blocked, attention kept within a document
    (``document_ids`` (B, L)), and the diagonal open so that no row is fully blocked."""
    if allowed is None:
        ref = padding_mask if padding_mask is not None else document_ids
        if ref is None and length is None:
            raise DLMError("attention_allowed needs allowed, padding_mask, document_ids or length")
        length = ref.shape[-1] if ref is not None else length
        device = ref.device if ref is not None else None
        allowed = torch.ones(1, length, length, dtype=torch.bool, device=device)
    if allowed.dim() == 2:
        allowed = allowed[None]
    if padding_mask is not None:
        allowed = allowed & padding_mask.to(allowed.device).bool()[:, None, :]
    if document_ids is not None:
        docs = document_ids.to(allowed.device)
        allowed = allowed & (docs[:, :, None] == docs[:, None, :])
    eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    return allowed | eye


def additive_attention_mask(
    allowed: Optional[torch.Tensor],
    padding_mask: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
    document_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Additive float mask (B or 1, 1, L, L): 0 where attention is allowed, dtype-min elsewhere.

    ``allowed`` is (L, L) or (B, L, L) (None = everything); ``padding_mask`` (B, L) with 1 for real
    tokens blocks padded keys; ``document_ids`` (B, L) keeps attention within a document. The
    diagonal stays open so that no row is fully blocked.
    """
    allowed = attention_allowed(allowed, padding_mask, document_ids)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
