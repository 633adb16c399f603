"""``TextDataModule``: packed pretraining data for Lightning, resumable batch for batch.

Resume bookkeeping: the module counts the batches training actually consumed (in
``on_before_batch_transfer``, from each batch's ``index``; the Trainer prefetches, so counting at
transfer time is right) and keeps, per DataLoader worker slot, the ``data_cursor`` of the last
consumed batch: that slot's position in its sources after it (see
:mod:`lightning_dlm.data.stream`). ``state_dict()`` saves the count and the cursors of *every*
rank (Lightning calls it on every rank but writes rank 0's checkpoint, so the ranks' cursors are
gathered with ``all_gather_object``); on resume (Lightning calls ``load_state_dict`` before
``train_dataloader``) the training stream starts at that counter, each slot from its cursor,
without re-reading or re-tokenizing what was consumed, and sees exactly the batches the
interrupted run would have. A checkpoint without cursors (written before they existed) resumes
by regenerating the consumed batches, exactly but slowly. Loader state is deliberately *not*
saved through Lightning: its loader-state saving runs one batch ahead of training and keeps
rank 0's state only. What it shares with the SFT module (options, counting, the order check, the
training loader) is :class:`~lightning_dlm.data.base.StreamingDataModule`.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_dlm.core.errors import require
from lightning_dlm.data.base import StreamingDataModule
from lightning_dlm.data.packing import DocumentEncoder, load_tokenizer
from lightning_dlm.data.sources import Corpus, CorpusSource, count_documents, open_corpora
from lightning_dlm.data.stream import (
    CURSOR_VERSION,
    BlockDataset,
    PackedBatchStream,
    ShardSampler,
    build_eval_blocks,
    too_few_documents_error,
)

#: Settings the data order depends on; a resume must keep them.
_ORDER_KEYS = ("world_size", "num_workers", "seed", "seq_len", "batch_size")


class TextDataModule(StreamingDataModule):
    """Packed text corpora for masked-diffusion continual pretraining.

    Training: an infinite stream of ``dict(input_ids=LongTensor(batch_size, seq_len),
    index=LongTensor())`` batches per rank (documents + EOS, concatenated, cut into blocks of
    exactly ``seq_len`` tokens; several sources mixed by weight); its length is set by
    ``trainer.max_steps``. Validation/test: the first ``val_max_blocks`` blocks of the val/test
    sources, fixed once in ``setup()``, as ``dict(input_ids=...)`` batches.

    Args:
        train: Training sources (mixed by their weights).
        val: Validation sources; none skips validation.
        test: Test sources.
        tokenizer: Tokenizer directory or hub name for ``AutoTokenizer``; may be set after
            construction (the CLI links it from the model), but before ``setup()``.
        seq_len: Tokens per block.
        batch_size: Blocks per batch (per rank).
        num_workers: DataLoader worker processes for training (0: the main process).
        seed: Data seed (document shuffling, source mixture).
        val_max_blocks: Blocks kept for validation (and for test).
        shuffle_buffer: Documents in the per-epoch shuffle buffer; 0 keeps the corpus order.
        add_bos: Put BOS before every document.
        add_eos: Put EOS after every document.
        document_ids: Training batches also carry ``document_ids`` so that attention stays within
            each packed document (the model passes them to its attention mask; sdpa, eager and
            flex_attention all honour them).
    """

    ORDER_KEYS = _ORDER_KEYS
    STREAM = "training"
    ORDER_CHANGED = ("cannot resume the data stream exactly: {key} changed from {saved} (checkpoint) to {current}, "
                     "and the data order depends on it; resume with data/trainer {key}={saved}")
    SEQ_LEN_NOTE = ": with the shift a block of one token has no target to predict"
    _encoder: Optional[DocumentEncoder]
    _train: Optional[list[Corpus]]

    def __init__(
        self,
        train: list[CorpusSource],
        val: Optional[list[CorpusSource]] = None,
        test: Optional[list[CorpusSource]] = None,
        tokenizer: Optional[str] = None,
        seq_len: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        val_max_blocks: int = 64,
        shuffle_buffer: int = 0,
        add_bos: bool = False,
        add_eos: bool = True,
        document_ids: bool = False,
    ):
        super().__init__(tokenizer, seq_len, batch_size, num_workers, seed)
        require(val_max_blocks >= 1, f"data.val_max_blocks must be >= 1 (got {val_max_blocks})")
        require(shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0 (got {shuffle_buffer}); 0 keeps the order")
        self.train_sources = list(train)
        self.val_sources = list(val) if val else []
        self.test_sources = list(test) if test else []
        self.val_max_blocks = val_max_blocks
        self.shuffle_buffer = shuffle_buffer
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.document_ids = document_ids
        self._cursors: dict[int, dict] = {}  # worker slot -> data_cursor of its last consumed batch (this rank)
        self._val_blocks = None
        self._test_blocks = None

    # ------------------------------------------------------------------ setup

    def _build_encoder(self) -> DocumentEncoder:
        """The document tokenizer."""
        if self.num_workers > 0:
            # Forking workers after the Rust tokenizer used its thread pool makes it warn and
            # fall back; the workers parallelise instead.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return DocumentEncoder(load_tokenizer(self.tokenizer), add_bos=self.add_bos, add_eos=self.add_eos)

    def setup(self, stage: Optional[str] = None) -> None:
        """Open and check the corpora and tokenizer, and build the evaluation blocks.

        Fails early, with a one-line :class:`DLMError`, on a missing file, a tokenizer without EOS,
        an empty corpus or a missing text field.
        """
        encoder = self.encoder
        if stage in (None, "fit"):
            require(len(self.train_sources) > 0, "data.train is empty; give at least one training source (path: ...)")
            if self._train is None:
                self._train = open_corpora(self.train_sources)
        if stage in (None, "fit", "validate") and self.val_sources and self._val_blocks is None:
            self._val_blocks = build_eval_blocks(open_corpora(self.val_sources), encoder, self.seq_len, self.val_max_blocks)
            rank_zero_info(f"data: {self._val_blocks.shape[0]} validation blocks of {self.seq_len} tokens")
        if stage == "test":
            require(len(self.test_sources) > 0, "no test corpus is configured; set data.test (a list of sources)")
            if self._test_blocks is None:
                self._test_blocks = build_eval_blocks(open_corpora(self.test_sources), encoder, self.seq_len, self.val_max_blocks)
                rank_zero_info(f"data: {self._test_blocks.shape[0]} test blocks of {self.seq_len} tokens")

    # ------------------------------------------------------------ dataloaders

    def _make_stream(self, rank: int, world_size: int, start_batch: int, resume: bool) -> PackedBatchStream:
        stream = PackedBatchStream(
            self._train,
            self.encoder,
            self.seq_len,
            self.batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=self.num_workers,
            seed=self.seed,
            start_batch=start_batch,
            cursors=self._cursors if resume else None,
            shuffle_buffer=self.shuffle_buffer,
            document_ids=self.document_ids,
        )
        for corpus in self._train:  # catch "too few documents" here, as one line, not in a worker
            if count_documents(corpus, limit=stream.num_slots) < stream.num_slots:
                raise too_few_documents_error(corpus, world_size, stream.workers_per_rank)
        stream.check_cursors()
        return stream

    def _resume_note(self) -> str:
        return (" from the saved data positions" if self._cursors else
                " by regenerating the consumed batches (the checkpoint has no saved data positions)")

    def _eval_loader(self, blocks) -> Union[DataLoader, list]:
        if blocks is None:
            return []
        dataset = BlockDataset(blocks)
        rank, world_size = self._rank_and_world()
        sampler = ShardSampler(dataset, world_size, rank) if world_size > 1 else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler)

    def val_dataloader(self) -> Union[DataLoader, list]:
        if self.val_sources and self._val_blocks is None:
            self.setup("validate")
        return self._eval_loader(self._val_blocks)

    def test_dataloader(self) -> Union[DataLoader, list]:
        if self._test_blocks is None:
            self.setup("test")
        return self._eval_loader(self._test_blocks)

    # ----------------------------------------------------------------- resume

    def _keep_cursor(self, index: int, cursor: dict) -> None:
        """The cursor of a consumed batch replaces its worker slot's."""
        self._cursors[index % max(1, self.num_workers)] = cursor

    def _all_cursors(self) -> dict[int, dict]:
        """``{rank: {worker slot: cursor}}`` of every rank (a collective when distributed)."""
        rank, world_size = self._rank_and_world()
        if world_size > 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size:
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, self._cursors)
            return {r: dict(c or {}) for r, c in enumerate(gathered)}
        return {rank: dict(self._cursors)}

    def _position_state(self) -> dict[str, Any]:
        """Every rank's cursors (a collective when distributed: Lightning saves on every rank)."""
        return {"cursor_version": CURSOR_VERSION, "cursors": self._all_cursors()}

    def _load_position_state(self, state_dict: dict[str, Any]) -> None:
        """This rank's cursors, when the checkpoint's are of this version (else the batches are regenerated)."""
        rank, _ = self._rank_and_world()
        cursors = state_dict.get("cursors") or {}
        mine = cursors.get(rank, cursors.get(str(rank))) if state_dict.get("cursor_version") == CURSOR_VERSION else None
        self._cursors = {int(k): v for k, v in (mine or {}).items()}
