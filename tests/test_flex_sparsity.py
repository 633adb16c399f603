"""Block sparsity of the FlexAttention annealing masks (issue 23 item 4), on the CPU.

FlexAttention's cost follows its BlockMask: a 128 x 128 block whose scores are all allowed runs
without the mask_mod (full), one with none allowed is skipped (empty), and only the rest (partial)
evaluate the mask_mod on every score. ``create_block_mask`` classifies each block from the mask_mod
itself; these tests check that classification against the dense pattern, block by block, and the
counts that make ``right_context`` cheap and ``random`` expensive.
"""

from __future__ import annotations

import pytest
import torch

from lightning_dlm.core.annealing import annealing_mask
from lightning_dlm.model.flex_masks import block_counts, flex_block_mask

L, BLOCK = 1024, 128
N = L // BLOCK  # blocks per side


def dense_classes(kind, ratio, seed):
    """(full, partial, empty) counts of the dense pattern (the annealing mask with its diagonal)."""
    allowed = annealing_mask(kind, ratio, seed).dense(L) | torch.eye(L, dtype=torch.bool)
    blocks = allowed.view(N, BLOCK, N, BLOCK).permute(0, 2, 1, 3).reshape(N, N, -1)
    full, empty = blocks.all(-1), ~blocks.any(-1)
    return int(full.sum()), int((~full & ~empty).sum()), int(empty.sum())


@pytest.mark.parametrize("kind", ["random", "right_context"])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_the_block_mask_marks_full_and_empty_blocks_as_the_dense_pattern_has_them(kind, ratio):
    counts = block_counts(flex_block_mask(1, L, annealing_mask(kind, ratio, 7), block_size=BLOCK))
    assert (counts["full"], counts["partial"], counts["empty"]) == dense_classes(kind, ratio, 7)
    assert counts["total"] == N * N


def test_right_context_leaves_few_partial_blocks_and_random_leaves_none_skippable():
    below = N * (N - 1) // 2  # blocks strictly below the diagonal: causal, full for every kind
    for ratio in (0.1, 0.5, 0.9):
        rand = block_counts(flex_block_mask(1, L, annealing_mask("random", ratio, 3), block_size=BLOCK))
        right = block_counts(flex_block_mask(1, L, annealing_mask("right_context", ratio, 3), block_size=BLOCK))
        # random: every block on or above the diagonal evaluates the hash on every score, none is skipped
        assert rand == dict(full=below, partial=N * N - below, empty=0, total=N * N)
        # right_context: a contiguous reach per row, so about one boundary block per query block
        assert right["partial"] <= 2 * N and right["full"] >= below
        assert right["full"] + right["partial"] <= rand["full"] + rand["partial"]  # blocks computed at all
    half = block_counts(flex_block_mask(1, L, annealing_mask("right_context", 0.5, 3), block_size=BLOCK))
    assert half["empty"] >= N * N // 8  # about a quarter of the grid is skipped at ratio 0.5
    # the endpoints: causal (ratio 0) and bidirectional (no mask)
    causal = block_counts(flex_block_mask(1, L, annealing_mask("right_context", 0.0, 3), block_size=BLOCK))
    assert causal == dict(full=below, partial=N, empty=below, total=N * N)
    assert block_counts(flex_block_mask(1, L, None, block_size=BLOCK)) == dict(full=N * N, partial=0, empty=0,
                                                                               total=N * N)
