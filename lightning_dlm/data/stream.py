"""The sharded, resumable training stream and the fixed evaluation blocks.

Resume design
-------------
Lightning's own loader-state saving is one batch ahead (the Trainer prefetches) and saves only
rank 0's state, so the training stream keeps no state at all: the batch with global counter ``n``
on a rank is a *pure function* of (seed, rank, world_size, num_workers, corpus, n). Resuming is
then just "start the stream at counter ``n0``", where ``n0`` is the number of batches training has
consumed (counted by the datamodule, saved in the checkpoint).

* Slots. With ``W = max(1, num_workers)`` DataLoader workers per rank there are
  ``S = world_size * W`` slots; worker ``w`` of rank ``r`` is slot ``r * W + w``. Each slot reads
  its own documents and packs them into its own infinite block stream:

  - file level: when the corpus has a number of shards (files) divisible by ``S``, slot ``s``
    reads ``dataset.shard(num_shards=S, index=s)`` only (cheap for hub-scale corpora);
  - example level: otherwise every slot reads the whole stream but keeps (and tokenizes) only
    documents ``i`` with ``i % S == s`` (``i`` counts non-empty documents).

  The corpus is read in epochs, forever; with ``shuffle_buffer > 0`` each epoch reshuffles with a
  buffer seeded from (seed, epoch, source), identically on every slot, so the example-level split
  stays a partition. With several sources each slot keeps one packer per source and draws the
  source of every block from a ``numpy`` Generator seeded with (seed, rank, slot).

* Batches. Batch ``n`` of a rank is made by the slot of worker ``n % W`` as that slot's
  ``(n // W)``-th batch (blocks ``[k*B, (k+1)*B)`` of its block stream). A torch DataLoader asks
  its workers round-robin (loader-local batch ``j`` comes from worker ``j % W``), so a loader
  started at counter ``n0`` has its worker ``w`` serve counters ``n0 + w + i*W``: worker slot
  ``(n0 + w) % W`` from that slot's batch ``(n0 + w) // W`` on. The worker fast-forwards by
  regenerating and discarding the earlier blocks, which is exact (and logged). The cost of a
  resume is therefore re-tokenizing what that slot consumed before.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, IterableDataset, get_worker_info

from lightning_dlm.data.packing import DocumentEncoder, pack_blocks
from lightning_dlm.data.sources import Corpus, is_document
from lightning_dlm.errors import DLMError, require

log = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int, source_index: int) -> int:
    """The shuffle-buffer seed of one epoch of one source (the same on every rank and worker)."""
    return int(np.random.SeedSequence([seed, epoch, source_index]).generate_state(1)[0])


class PackedBatchStream(IterableDataset):
    """Infinite stream of packed training batches for one rank; see the module docstring.

    Yields ``dict(input_ids=LongTensor(batch_size, seq_len), index=LongTensor())`` where
    ``index`` is the global batch counter on this rank. Use it with
    ``DataLoader(stream, batch_size=None, num_workers=num_workers)``; ``num_workers`` must match.

    Args:
        corpora: Opened training sources (weights already normalised).
        encoder: Tokenizes documents (with EOS / BOS).
        seq_len: Tokens per block.
        batch_size: Blocks per batch.
        rank, world_size: This process's place among the data-parallel ranks.
        num_workers: The DataLoader's ``num_workers`` (0: the main process is the one worker).
        seed: Data seed (shuffle buffers and source mixture).
        start_batch: The global batch counter of the first batch to serve (resume point).
        shuffle_buffer: Documents in the per-epoch shuffle buffer; 0 keeps the corpus order.
        doc_batch_size: Documents read and tokenized per call.
        document_ids: Also yield ``document_ids`` (batch_size, seq_len): which packed document
            each token comes from (0 for the first of its block), for attention kept within
            documents.
    """

    def __init__(
        self,
        corpora: Sequence[Corpus],
        encoder: DocumentEncoder,
        seq_len: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        start_batch: int = 0,
        shuffle_buffer: int = 0,
        doc_batch_size: int = 64,
        document_ids: bool = False,
    ):
        super().__init__()
        require(len(corpora) > 0, "the training corpus list is empty; set data.train")
        require(0 <= rank < world_size, f"rank {rank} is outside world_size {world_size}")
        self.corpora = list(corpora)
        self.encoder = encoder
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.seed = seed
        self.start_batch = start_batch
        self.shuffle_buffer = shuffle_buffer
        self.doc_batch_size = doc_batch_size
        self.document_ids = document_ids
        weights = np.asarray([corpus.weight for corpus in self.corpora], dtype=np.float64)
        self.weights = weights / weights.sum()

    @property
    def workers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_slots(self) -> int:
        return self.world_size * self.workers_per_rank

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None:
            if self.num_workers > 0:
                raise RuntimeError(
                    f"PackedBatchStream built for num_workers={self.num_workers} is iterated in the main process; "
                    "iterate it through DataLoader(num_workers=...) or use iter_worker(w)"
                )
            return self.iter_worker(0)
        if info.num_workers != self.num_workers:
            raise RuntimeError(
                f"PackedBatchStream built for num_workers={self.num_workers} runs in a DataLoader with "
                f"{info.num_workers} workers; they must match"
            )
        import fsspec.asyn  # a forked worker must not reuse the parent's fsspec event-loop lock (hub streams)

        fsspec.asyn.reset_lock()
        return self.iter_worker(info.id)

    def iter_worker(self, worker: int) -> Iterator[dict]:
        """The batches DataLoader worker ``worker`` serves: counters ``start_batch + worker + i * W``."""
        W = self.workers_per_rank
        first = self.start_batch + worker
        local_slot = first % W
        slot = self.rank * W + local_slot
        blocks = self._slot_blocks(slot)
        skip = (first // W) * self.batch_size
        if skip:
            began = time.perf_counter()
            for _ in range(skip):
                next(blocks)
            log.info(
                "data resume: rank %d worker %d skipped %d blocks (%d batches of slot %d) in %.1fs to reach batch %d",
                self.rank, worker, skip, first // W, slot, time.perf_counter() - began, first,
            )
        counter = first
        while True:
            chosen = [next(blocks) for _ in range(self.batch_size)]
            if self.document_ids:
                item = {"input_ids": torch.from_numpy(np.stack([b for b, _ in chosen])),
                        "document_ids": torch.from_numpy(np.stack([d for _, d in chosen]))}
            else:
                item = {"input_ids": torch.from_numpy(np.stack(chosen))}
            item["index"] = torch.tensor(counter, dtype=torch.long)
            yield item
            counter += W

    def _slot_blocks(self, slot: int) -> Iterator[np.ndarray]:
        """Slot ``slot``'s infinite block stream (one packer per source, mixed by weight)."""
        packers = [pack_blocks(self._slot_documents(i, slot), self.seq_len, document_ids=self.document_ids)
                   for i in range(len(self.corpora))]
        if len(packers) == 1:
            yield from packers[0]
            return
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, slot]))
        while True:
            yield next(packers[rng.choice(len(packers), p=self.weights)])

    def _slot_documents(self, source_index: int, slot: int) -> Iterator[np.ndarray]:
        """Token arrays of the documents of one source assigned to ``slot``, epoch after epoch."""
        corpus = self.corpora[source_index]
        S = self.num_slots
        file_level = corpus.dataset.num_shards % S == 0
        epoch = 0
        while True:
            dataset = corpus.dataset
            if file_level and S > 1:
                dataset = dataset.shard(num_shards=S, index=slot)
            if self.shuffle_buffer > 0:
                dataset = dataset.shuffle(seed=epoch_seed(self.seed, epoch, source_index), buffer_size=self.shuffle_buffer)
            seen = 0  # non-empty documents read (example level: over all slots)
            mine = 0
            tokens = 0
            for texts in corpus.texts(dataset, batch_size=self.doc_batch_size):
                kept = []
                for text in texts:
                    if not is_document(text):
                        continue
                    if file_level or seen % S == slot:
                        kept.append(text)
                    seen += 1
                mine += len(kept)
                for ids in self.encoder(kept):
                    tokens += len(ids)
                    yield ids
            if mine == 0:
                raise too_few_documents_error(corpus, self.world_size, self.workers_per_rank)
            if epoch == 0 and tokens < self.seq_len:
                raise DLMError(
                    f"corpus '{corpus.label}' gives {tokens} tokens per pass{' to each data slot' if S > 1 else ''}, "
                    f"fewer than one block of data.seq_len {self.seq_len}: training would repeat the same text; give "
                    f"more text or lower data.seq_len"
                )
            epoch += 1


def too_few_documents_error(corpus: Corpus, world_size: int, workers: int) -> DLMError:
    return DLMError(
        f"corpus '{corpus.label}' has too few documents for {world_size} rank(s) x {workers} worker(s) "
        f"(a slot got none); lower data.num_workers or use smaller documents (e.g. sample_by: paragraph)"
    )


def build_eval_blocks(
    corpora: Sequence[Corpus], encoder: DocumentEncoder, seq_len: int, max_blocks: int, doc_batch_size: int = 64
) -> torch.Tensor:
    """The first blocks packed from the evaluation sources, as one deterministic tensor.

    Independent of ranks and workers. ``max_blocks`` is shared among the sources in proportion to
    their weights (largest remainder); each source is read once from its start, in corpus order,
    and packed on its own, so every block comes from one source. Returns ``LongTensor(n, seq_len)``.
    """
    quotas = _split_quota(max_blocks, [corpus.weight for corpus in corpora])
    blocks: list[np.ndarray] = []
    for corpus, quota in zip(corpora, quotas):
        if quota == 0:
            continue

        def documents(corpus: Corpus = corpus) -> Iterator[np.ndarray]:
            for texts in corpus.texts(batch_size=doc_batch_size):
                yield from encoder([text for text in texts if is_document(text)])

        for i, block in enumerate(pack_blocks(documents(), seq_len)):
            blocks.append(block)
            if i + 1 == quota:
                break
    if not blocks:
        names = ", ".join(f"'{corpus.label}'" for corpus in corpora)
        raise DLMError(f"evaluation corpus {names} has fewer than seq_len={seq_len} tokens; add text or lower data.seq_len")
    return torch.from_numpy(np.stack(blocks))


def _split_quota(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest-remainder rounding)."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = total * weights / weights.sum()
    quotas = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quotas), kind="stable")[: total - int(quotas.sum())]:
        quotas[i] += 1
    return quotas.tolist()


class BlockDataset(Dataset):
    """Map-style dataset over materialised blocks: item ``i`` is ``dict(input_ids=blocks[i],
    block_index=i)`` (the index keys the evaluation noise of the block)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "block_index": torch.tensor(index, dtype=torch.long)}


class ShardSampler(DistributedSampler):
    """Rank ``r`` of ``W`` takes items ``r, r + W, r + 2W, ...``: every item exactly once over the
    ranks, without the padding (repeated items) of torch's DistributedSampler, so an evaluation
    metric averaged over ranks equals the single-process one. Lightning keeps a
    DistributedSampler it is given."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices = list(range(rank, len(dataset), num_replicas))
        self.num_samples = len(self.indices)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples
