"""Deterministic seeds derived from tuples of integers (e.g. (seed, global step, rank))."""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across runs and machines)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(*parts: int, device: Optional[torch.device] = None) -> torch.Generator:
    """A torch generator on ``device`` seeded from ``parts``."""
    return torch.Generator(device=device or "cpu").manual_seed(derive_seed(*parts))


def epoch_seed(seed: int, epoch: int, source_index: int) -> int:
    """The shuffle-buffer seed of one epoch of one source (the same on every rank and worker)."""
    return int(np.random.SeedSequence([seed, epoch, source_index]).generate_state(1)[0])
