"""The sharded, resumable training stream and the fixed evaluation blocks.

Resume design
-------------
Lightning's own loader-state saving is one batch ahead (the Trainer prefetches) and saves only
rank 0's state, so the stream does its own bookkeeping. The batch with global counter ``n`` on a
rank is a *pure function* of (seed, rank, world_size, num_workers, corpus, n), and every batch
carries a small **cursor**: its data slot's position *after* that batch. The datamodule keeps the
cursor of the last batch training consumed from each slot and saves them for every rank; a
resume starts each slot from its cursor, reading nothing before it and tokenizing nothing that
was consumed. The cost of a resume does not grow with the steps already taken.

* Slots. With ``W = max(1, num_workers)`` DataLoader workers per rank there are
  ``S = world_size * W`` slots; worker ``w`` of rank ``r`` is slot ``r * W + w``. Each slot reads
  its own documents and packs them into its own infinite block stream:

  - file level: when the corpus has a number of files (shards) divisible by ``S``, slot ``s``
    reads the ``s``-th contiguous ``1/S`` of the files only (``dataset.shard(num_shards=S,
    index=s)``; cheap for hub-scale corpora);
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
  ``(n0 + w) % W`` from that slot's batch ``(n0 + w) // W`` on.

* Cursors. Packing cuts the concatenated documents into blocks; at a block boundary what is left
  over is always the tail of the *last* document read (the buffer held less than a block before
  it was read). So a slot's position is, per source: the epoch, the position of that document's
  record in the source (or of the next record when nothing is left over), how many of its tokens
  were already used (``skip``), the document counter ``i`` of the example-level split and two
  counts for the end-of-epoch checks; plus the state of the mixture Generator. Batches carry it
  as ``batch["data_cursor"]`` (plain ints and lists; the datamodule takes it out of the batch
  before the model sees it). A resume re-tokenizes at most that one partly used document.

  How a position is found again depends on the source's reader (:mod:`.sources`):

  - local uncompressed text files (any ``sample_by``) and JSON Lines files, read in corpus order
    (``shuffle_buffer: 0``), are read by our own reader: a position is (file, byte offset) and a
    resume seeks there: O(1), nothing before it is read. A checksum of the bytes before the
    offset is saved with it, so a resume on a changed corpus stops with one line;
  - everything else (hub datasets, parquet, ``.json``, compressed files, and any source with a
    shuffle buffer, whose buffer content cannot be restored from a position) is read through
    ``datasets`` streaming: a position is the record number in the epoch's stream, and a resume
    reads and discards the earlier records of that epoch *without tokenizing them*, the
    expensive part. (``datasets``' own ``IterableDataset.state_dict`` refills a shuffle buffer
    on resume, so it is not exact; torchdata's ``StatefulDataLoader`` saves the loader's state,
    one batch ahead of training and on rank 0 only, like Lightning's; litdata would need a
    pre-tokenized copy of the corpus. Our cursor keeps resume exact with no new dependency.)

* Old checkpoints (no cursor) and slots without one fall back to regeneration: the worker
  regenerates and discards the slot's earlier blocks, which is exact (and logged) but
  re-tokenizes everything that slot consumed.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, IterableDataset, get_worker_info

from lightning_dlm.core.errors import DLMError, require
from lightning_dlm.data.packing import DocumentEncoder, pack_blocks
from lightning_dlm.data.sources import Corpus, DatasetsReader, LocalFileReader, is_document

log = logging.getLogger(__name__)


#: Version of the cursor layout in batches and checkpoints.
CURSOR_VERSION = 1


class PackedBatchStream(IterableDataset):
    """Infinite stream of packed training batches for one rank; see the module docstring.

    Yields ``dict(input_ids=LongTensor(batch_size, seq_len), index=LongTensor(), data_cursor=dict)``
    where ``index`` is the global batch counter on this rank and ``data_cursor`` the position of
    the batch's slot after it. Use it with ``DataLoader(stream, batch_size=None,
    num_workers=num_workers)``; ``num_workers`` must match.

    Args:
        corpora: Opened training sources (weights already normalised).
        encoder: Tokenizes documents (with EOS / BOS).
        seq_len: Tokens per block.
        batch_size: Blocks per batch.
        rank, world_size: This process's place among the data-parallel ranks.
        num_workers: The DataLoader's ``num_workers`` (0: the main process is the one worker).
        seed: Data seed (shuffle buffers and source mixture).
        start_batch: The global batch counter of the first batch to serve (resume point).
        cursors: ``{worker slot w: cursor}`` of this rank: the ``data_cursor`` of the last batch
            consumed from each worker slot (the resume state). A slot with ``start_batch`` past its
            first batch and no cursor is fast-forwarded by regeneration.
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
        cursors: Optional[dict] = None,
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
        self.cursors = {int(k): v for k, v in (cursors or {}).items()}
        self.shuffle_buffer = shuffle_buffer
        self.doc_batch_size = doc_batch_size
        self.document_ids = document_ids
        weights = np.asarray([corpus.weight for corpus in self.corpora], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.readers = [
            LocalFileReader(corpus) if LocalFileReader.supports(corpus, shuffle_buffer)
            else DatasetsReader(corpus, shuffle_buffer, seed, i, doc_batch_size)
            for i, corpus in enumerate(self.corpora)
        ]

    @property
    def workers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_slots(self) -> int:
        return self.world_size * self.workers_per_rank

    def file_level(self, source_index: int) -> bool:
        return self.corpora[source_index].dataset.num_shards % self.num_slots == 0

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

    def check_cursors(self) -> None:
        """Check, in the main process and in one line, that the saved cursors fit this stream and
        the corpus files as they are now (a worker's error would not be one line)."""
        W = self.workers_per_rank
        for local_slot, cursor in self.cursors.items():
            expected = self.rank * W + local_slot
            if (not isinstance(cursor, dict) or cursor.get("version") != CURSOR_VERSION or cursor.get("slot") != expected
                    or len(cursor.get("sources", ())) != len(self.corpora)):
                raise DLMError(
                    f"cannot resume the data stream: the checkpoint's data position of worker slot {local_slot} does "
                    f"not fit this run's {len(self.corpora)} training source(s); resume with the original data config or "
                    f"start a new run"
                )
            for reader, state in zip(self.readers, cursor["sources"]):
                if state.get("reader") != reader.kind:
                    raise DLMError(
                        f"cannot resume the data stream: corpus '{reader.corpus.label}' is read differently than when the "
                        f"checkpoint was written (its files, format or data.shuffle_buffer changed); resume with the "
                        f"original corpus or start a new run"
                    )
                if isinstance(reader, LocalFileReader) and state.get("position") is not None:
                    reader.check_position(state["position"], state)

    def iter_worker(self, worker: int) -> Iterator[dict]:
        """The batches DataLoader worker ``worker`` serves: counters ``start_batch + worker + i * W``."""
        W = self.workers_per_rank
        first = self.start_batch + worker
        local_slot = first % W
        slot = self.rank * W + local_slot
        k = first // W  # the slot's batch number of the first batch served
        cursor = self.cursors.get(local_slot)
        if cursor is not None and k > 0:
            if cursor.get("batches") != k:
                raise DLMError(
                    f"cannot resume the data stream: worker slot {local_slot}'s saved position is after its batch "
                    f"{cursor.get('batches')}, but batch {first} is its batch {k}; the checkpoint is inconsistent"
                )
            began = time.perf_counter()
            state = SlotStream(self, slot, cursor)
            log.info("data resume: rank %d worker %d resumed slot %d at its batch %d from a cursor in %.3fs",
                     self.rank, worker, slot, k, time.perf_counter() - began)
        else:
            state = SlotStream(self, slot)
            if k:
                began = time.perf_counter()
                for _ in range(k * self.batch_size):
                    state.next_block()
                log.info(
                    "data resume: rank %d worker %d regenerated and skipped %d blocks (%d batches of slot %d) in %.1fs "
                    "to reach batch %d (no saved cursor)",
                    self.rank, worker, k * self.batch_size, k, slot, time.perf_counter() - began, first,
                )
            state.batches = k
        counter = first
        while True:
            yield state.next_batch(counter)
            counter += W


class SlotStream:
    """One slot's block stream, resumable from its cursor: one :class:`SourcePacker` per source,
    mixed by the weights with a ``numpy`` Generator seeded with (seed, rank, slot)."""

    def __init__(self, stream: PackedBatchStream, slot: int, cursor: Optional[dict] = None):
        self.stream = stream
        self.slot = slot
        self.batches = 0 if cursor is None else int(cursor["batches"])
        sources = cursor["sources"] if cursor is not None else [None] * len(stream.corpora)
        self.packers = [SourcePacker(stream, i, slot, state) for i, state in enumerate(sources)]
        self.rng = None
        if len(self.packers) > 1:
            self.rng = np.random.default_rng(np.random.SeedSequence([stream.seed, stream.rank, slot]))
            if cursor is not None:
                self.rng.bit_generator.state = cursor["rng"]

    def next_block(self):
        if self.rng is None:
            return self.packers[0].next_block()
        return self.packers[self.rng.choice(len(self.packers), p=self.stream.weights)].next_block()

    def next_batch(self, counter: int) -> dict:
        chosen = [self.next_block() for _ in range(self.stream.batch_size)]
        self.batches += 1
        if self.stream.document_ids:
            item = {"input_ids": torch.from_numpy(np.stack([b for b, _ in chosen])),
                    "document_ids": torch.from_numpy(np.stack([d for _, d in chosen]))}
        else:
            item = {"input_ids": torch.from_numpy(np.stack(chosen))}
        item["index"] = torch.tensor(counter, dtype=torch.long)
        item["data_cursor"] = self.cursor()
        return item

    def cursor(self) -> dict:
        """This slot's position now: plain ints, strings and lists (batches, checkpoints)."""
        return {
            "version": CURSOR_VERSION,
            "slot": self.slot,
            "batches": self.batches,
            "sources": [packer.cursor() for packer in self.packers],
            "rng": None if self.rng is None else self.rng.bit_generator.state,
        }


class SourcePacker:
    """The blocks one source gives one slot: its documents (epoch after epoch), tokenized and cut
    into ``seq_len`` blocks, resumable from :meth:`cursor` (see the module docstring)."""

    def __init__(self, stream: PackedBatchStream, source_index: int, slot: int, state: Optional[dict] = None):
        self.stream = stream
        self.source_index = source_index
        self.slot = slot
        self.reader = stream.readers[source_index]
        self.corpus = stream.corpora[source_index]
        self.file_level = stream.file_level(source_index)
        self.start = dict(state) if state is not None else {
            "reader": self.reader.kind, "epoch": 0, "position": None, "seen": 0, "skip": 0, "mine": 0, "tokens": 0}
        self.documents = self._documents(self.start)
        self.skip = int(self.start["skip"])  # tokens of the first document already used before the resume
        self.buffer = np.empty(0, dtype=np.int64)
        self.owners = np.empty(0, dtype=np.int64)
        self.count = 0
        self.last: Optional[tuple] = None  # (state before, state after, length) of the last document read

    def next_block(self):
        L = self.stream.seq_len
        while len(self.buffer) < L:
            ids, before, after = next(self.documents)
            length = len(ids)
            if self.skip:
                if self.skip >= length:
                    raise DLMError(
                        f"cannot resume the data stream: the saved document of corpus '{self.corpus.label}' has "
                        f"{length} tokens now, fewer than the {self.skip} already used; resume with the original corpus "
                        f"(and tokenizer) or start a new run"
                    )
                ids = ids[self.skip:]
                self.skip = 0
            self.buffer = np.concatenate([self.buffer, ids]) if len(self.buffer) else ids
            if self.stream.document_ids and len(ids):
                self.owners = np.concatenate([self.owners, np.full(len(ids), self.count, dtype=np.int64)])
                self.count += 1
            self.last = (before, after, length)
        block, self.buffer = self.buffer[:L], self.buffer[L:]
        if self.stream.document_ids:
            ids, self.owners = self.owners[:L], self.owners[L:]
            return block, ids - ids[0]
        return block

    def cursor(self) -> dict:
        if self.last is None:
            return dict(self.start)
        before, after, length = self.last
        state = dict(after) if len(self.buffer) == 0 else {**before, "skip": length - len(self.buffer)}
        if isinstance(self.reader, LocalFileReader) and state["position"] is not None:
            # what a resume checks the corpus against (one small read per batch, not per document)
            state.update(self.reader.fingerprint(state["position"]))
        return state

    def _documents(self, state: dict) -> Iterator[tuple]:
        """``(token ids, state before, state after)`` of the documents of this slot, from ``state`` on."""
        stream, reader, corpus = self.stream, self.reader, self.corpus
        S, slot = stream.num_slots, self.slot
        epoch, position = int(state["epoch"]), state["position"]
        seen, mine, tokens = int(state["seen"]), int(state["mine"]), int(state["tokens"])
        kind = reader.kind
        local = isinstance(reader, LocalFileReader)
        while True:
            if local:
                records = reader.records(reader.slot_files(S, slot, self.file_level), position)
            else:
                records = reader.records(reader.epoch_dataset(epoch, S, slot, self.file_level), position)
            pending: list = []

            def flush():
                nonlocal mine, tokens
                encoded = self.stream.encoder([text for text, _, _, _ in pending])
                for ids, (_, start, index, after) in zip(encoded, pending):
                    before = {"reader": kind, "epoch": epoch, "position": start, "seen": index, "skip": 0,
                              "mine": mine, "tokens": tokens}
                    mine += 1
                    tokens += len(ids)
                    following = {"reader": kind, "epoch": epoch, "position": after, "seen": index + 1, "skip": 0,
                                 "mine": mine, "tokens": tokens}
                    yield ids, before, following
                pending.clear()

            for text, start, after in records:
                if not is_document(text):
                    continue
                if self.file_level or seen % S == slot:
                    pending.append((text, start, seen, after))
                    if len(pending) >= stream.doc_batch_size:
                        yield from flush()
                seen += 1
            yield from flush()
            if mine == 0:
                raise too_few_documents_error(corpus, stream.world_size, stream.workers_per_rank)
            if epoch == 0 and tokens < stream.seq_len:
                raise DLMError(
                    f"corpus '{corpus.label}' gives {tokens} tokens per pass{' to each data slot' if S > 1 else ''}, "
                    f"fewer than one block of data.seq_len {stream.seq_len}: training would repeat the same text; give "
                    f"more text or lower data.seq_len"
                )
            epoch, position, seen, mine, tokens = epoch + 1, None, 0, 0, 0


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
