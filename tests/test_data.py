"""Tests of the data layer: packing, sharding over ranks x workers, exact resume, mixture, errors.

Everything runs offline on tiny corpora written into tmp_path, with a byte-level BPE tokenizer
built here (so these tests do not depend on any shipped fixture).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dlm.core.errors import DLMError
from lightning_dlm.data import CorpusSource, TextDataModule
from lightning_dlm.data.packing import DocumentEncoder, load_tokenizer, pack_blocks
from lightning_dlm.data.sources import open_corpora, open_corpus
from lightning_dlm.data.stream import PackedBatchStream, build_eval_blocks

EOS = "<|endoftext|>"
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "zeta", "iota"]


def _build_tokenizer(directory, eos: bool) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS, "<|bos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) + f" doc{i:04d} abcde vwxyz" for i in range(len(WORDS))]
    tok.train_from_iterator(corpus * 20, trainer)
    extra = {"eos_token": EOS, "bos_token": "<|bos|>"} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, **extra).save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return _build_tokenizer(tmp_path_factory.mktemp("tokenizer"), eos=True)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def encoder(tokenizer):
    return DocumentEncoder(tokenizer)


def doc_text(i: int, n_words: int = 6) -> str:
    return f"doc{i:04d} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n_words))


def write_lines(path, ids, n_words=6):
    path.write_text("".join(doc_text(i, n_words) + "\n" for i in ids))
    return str(path)


def doc_ids_of(tokens: torch.Tensor, tokenizer) -> list:
    """Document ids in a slot's token stream, in order (complete documents only)."""
    eos = tokenizer.eos_token_id
    pieces, current = [], []
    for token in tokens.tolist():
        if token == eos:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    ids = []
    for piece in pieces:  # the unterminated tail (current) is ignored
        match = re.search(r"doc(\d{4})", tokenizer.decode(piece))
        assert match, tokenizer.decode(piece)
        ids.append(int(match.group(1)))
    return ids


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


# --------------------------------------------------------------------------------------- packing


def test_packing_exact_blocks_eos_and_stream(encoder, tokenizer):
    texts = [doc_text(i, n_words=1 + (7 * i) % 13) for i in range(30)]
    docs = encoder(texts)
    eos = tokenizer.eos_token_id
    for doc, text in zip(docs, texts):
        assert doc[-1] == eos and eos not in doc[:-1]
        assert tokenizer.decode(doc[:-1]) == text
    stream = np.concatenate(docs)
    blocks = list(pack_blocks(docs, seq_len=16))
    assert all(block.shape == (16,) for block in blocks)
    assert len(blocks) == len(stream) // 16
    np.testing.assert_array_equal(np.concatenate(blocks), stream[: len(blocks) * 16])
    assert int((np.concatenate(blocks) == eos).sum()) >= len(texts) - 2  # only the dropped tail may hold EOS


def test_encoder_bos_and_literal_special_tokens(tokenizer):
    enc = DocumentEncoder(tokenizer, add_bos=True, add_eos=True)
    (doc,) = enc([f"text {EOS} more"])
    assert doc[0] == tokenizer.bos_token_id and doc[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in doc[1:-1]  # a literal EOS string in a document is text


# -------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("layout", ["file", "example"])
def test_sharding_two_ranks_two_workers_partitions_corpus(tmp_path, encoder, tokenizer, layout):
    n_docs = 40
    if layout == "file":  # 4 files = 4 slots: file-level sharding
        for f in range(4):
            write_lines(tmp_path / f"part{f}.txt", range(f * 10, f * 10 + 10))
        source = CorpusSource(str(tmp_path / "part*.txt"), sample_by="line")
    else:  # 1 file: example-level round-robin
        source = CorpusSource(write_lines(tmp_path / "all.txt", range(n_docs)), sample_by="line")
    corpora = open_corpora([source])
    assert (corpora[0].dataset.num_shards % 4 == 0) == (layout == "file")

    slot_ids = {}
    for rank in range(2):
        stream = PackedBatchStream(corpora, encoder, seq_len=16, batch_size=2, rank=rank, world_size=2, num_workers=2)
        batches = take(DataLoader(stream, batch_size=None, num_workers=2), 24)
        assert [int(b["index"]) for b in batches] == list(range(24))
        for worker in range(2):
            tokens = torch.cat([b["input_ids"].reshape(-1) for b in batches if int(b["index"]) % 2 == worker])
            slot_ids[rank * 2 + worker] = doc_ids_of(tokens, tokenizer)

    seen = [set(ids) for ids in slot_ids.values()]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not seen[a] & seen[b], "a document went to two slots"
    assert set().union(*seen) == set(range(n_docs)), "the slots do not cover the corpus"
    for ids in slot_ids.values():  # one epoch of a slot has no duplicate, and the next repeats it
        k = len(set(ids))
        assert len(ids) >= 2 * k and len(set(ids[:k])) == k and ids[k : 2 * k] == ids[:k]


def test_too_few_documents_for_slots(tmp_path, encoder):
    path = tmp_path / "one.txt"
    path.write_text(doc_text(0, 50))
    corpora = open_corpora([CorpusSource(str(path))])
    stream = PackedBatchStream(corpora, encoder, seq_len=8, batch_size=1, rank=1, world_size=2)
    with pytest.raises(DLMError, match="too few documents for 2 rank.*num_workers.*sample_by: paragraph"):
        next(iter(stream))
    dm = TextDataModule([CorpusSource(str(path))], tokenizer=encoder.tokenizer, seq_len=8, batch_size=1)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2, training=True, max_steps=10)
    with pytest.raises(DLMError, match="too few documents"):
        dm.train_dataloader()


# ---------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_matches_uninterrupted_stream(tmp_path, encoder, num_workers):
    a = write_lines(tmp_path / "a.txt", range(0, 25))
    b = write_lines(tmp_path / "b.txt", range(100, 117), n_words=3)
    corpora = open_corpora([CorpusSource(a, sample_by="line", weight=2), CorpusSource(b, sample_by="line")])

    def batches(start, n):
        stream = PackedBatchStream(
            corpora, encoder, seq_len=12, batch_size=3, rank=1, world_size=2,
            num_workers=num_workers, seed=7, start_batch=start, shuffle_buffer=8,
        )
        return take(DataLoader(stream, batch_size=None, num_workers=num_workers), n)

    full = batches(0, 14)
    for n0 in ([5] if num_workers else [1, 6]):
        resumed = batches(n0, 14 - n0)
        for expected, got in zip(full[n0:], resumed):
            assert int(got["index"]) == int(expected["index"])
            assert torch.equal(got["input_ids"], expected["input_ids"])
    assert full[0]["input_ids"].shape == (3, 12) and full[0]["input_ids"].dtype == torch.long


# --------------------------------------------------------------------------------------- mixture


def test_mixture_shares_follow_weights_and_are_deterministic(tmp_path, encoder, tokenizer):
    rng = np.random.default_rng(0)
    a = tmp_path / "a.txt"
    a.write_text("".join(" ".join("".join(rng.choice(list("abcde"), 4)) for _ in range(5)) + "\n" for _ in range(30)))
    b = tmp_path / "b.txt"
    b.write_text("".join(" ".join("".join(rng.choice(list("vwxyz"), 4)) for _ in range(5)) + "\n" for _ in range(30)))
    corpora = open_corpora(
        [CorpusSource(str(a), sample_by="line", weight=0.7), CorpusSource(str(b), sample_by="line", weight=0.3)]
    )

    def blocks():
        stream = PackedBatchStream(corpora, encoder, seq_len=8, batch_size=4, seed=3, shuffle_buffer=4)
        return torch.cat([batch["input_ids"] for batch in take(DataLoader(stream, batch_size=None), 50)])

    first = blocks()
    assert first.shape == (200, 8)
    assert torch.equal(first, blocks())
    from_a = 0
    for block in first:
        letters = set(tokenizer.decode(block, skip_special_tokens=True)) - {" ", "\n"}
        assert letters <= set("abcde") or letters <= set("vwxyz"), "a block mixes sources"
        from_a += letters <= set("abcde")
    assert 0.6 <= from_a / 200 <= 0.8


# ----------------------------------------------------------------------------------- datamodule


def test_datamodule_state_roundtrip_and_exact_resume(tmp_path, tokenizer_dir):
    train = [CorpusSource(write_lines(tmp_path / "train.txt", range(30)), sample_by="line")]
    val = [CorpusSource(write_lines(tmp_path / "val.txt", range(500, 520)), sample_by="line")]

    def make(**kw):
        dm = TextDataModule(train, val=val, tokenizer=tokenizer_dir, seq_len=8, batch_size=2, seed=1, val_max_blocks=5, **kw)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True, max_steps=100)
        dm.setup("fit")
        return dm

    dm = make()
    assert dm.seq_len == 8 and dm.batch_size == 2
    full = take(dm.train_dataloader(), 6)
    for batch in full[:4]:
        assert dm.on_before_batch_transfer(batch, 0) is batch
    dm.trainer.training = False  # validation batches do not count
    dm.on_before_batch_transfer({"input_ids": full[5]["input_ids"], "index": full[5]["index"]}, 0)
    state = dm.state_dict()
    cursors = state.pop("cursors")
    assert state == {"consumed_batches": 4, "world_size": 1, "num_workers": 0, "seed": 1, "seq_len": 8, "batch_size": 2,
                     "cursor_version": 1}
    assert list(cursors) == [0] and list(cursors[0]) == [0] and cursors[0][0]["batches"] == 4  # rank 0, worker slot 0
    assert all("data_cursor" not in batch for batch in full[:4])  # the cursor leaves the batch before the model
    state["cursors"] = cursors

    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.consumed_batches == 4
    for expected, got in zip(full[4:], take(resumed.train_dataloader(), 2)):
        assert int(got["index"]) == int(expected["index"])
        assert torch.equal(got["input_ids"], expected["input_ids"])

    val_loader = dm.val_dataloader()
    val_batches = list(val_loader)
    assert [b["input_ids"].shape[0] for b in val_batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in val_batches]), resumed._val_blocks)

    with pytest.raises(DLMError, match="num_workers changed from 0 .* to 2.*data order depends on it"):
        make(num_workers=2).load_state_dict(state)
    with pytest.raises(DLMError, match="world_size changed"):
        make().load_state_dict({**state, "world_size": 4})


def test_no_val_sources_gives_empty_val_loader(tmp_path, tokenizer):
    dm = TextDataModule([CorpusSource(write_lines(tmp_path / "t.txt", range(5)))], tokenizer=tokenizer, seq_len=8)
    dm.setup("fit")
    assert dm.val_dataloader() == []


def test_jsonargparse_builds_datamodule(tmp_path, tokenizer_dir):
    from jsonargparse import ArgumentParser

    path = write_lines(tmp_path / "t.txt", range(5))
    parser = ArgumentParser()
    parser.add_class_arguments(TextDataModule, "data")
    cfg = parser.parse_object(
        {"data": {"train": [{"path": path, "weight": 0.7, "sample_by": "line"}], "tokenizer": tokenizer_dir, "seq_len": 16}}
    )
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, TextDataModule) and dm.seq_len == 16
    assert dm.train_sources == [CorpusSource(path, weight=0.7, sample_by="line")]


# ------------------------------------------------------------------------------- formats, errors


def test_json_and_parquet_sources(tmp_path, encoder, tokenizer):
    import pandas as pd

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "content": doc_text(i)}) + "\n" for i in range(10)))
    parquet = tmp_path / "docs.parquet"
    pd.DataFrame({"text": [doc_text(i) for i in range(10, 20)]}).to_parquet(parquet)
    corpora = open_corpora([CorpusSource(str(jsonl), text_field="content"), CorpusSource(str(parquet))])
    blocks = build_eval_blocks(corpora, encoder, seq_len=8, max_blocks=10)
    assert blocks.shape == (10, 8)
    text = tokenizer.decode(blocks.reshape(-1))
    assert "doc0000" in text and "doc0010" in text  # 5 blocks from each source
    stream = PackedBatchStream(corpora, encoder, seq_len=8, batch_size=4)
    assert next(iter(stream))["input_ids"].shape == (4, 8)


def test_errors_are_one_line_and_helpful(tmp_path, tokenizer_dir):
    def message(fn):
        with pytest.raises(DLMError) as info:
            fn()
        text = str(info.value)
        assert "\n" not in text
        return text

    missing = str(tmp_path / "nope.txt")
    assert missing in message(lambda: open_corpus(CorpusSource(missing)))
    assert "matches no files" in message(lambda: open_corpus(CorpusSource(str(tmp_path / "*.jsonl"))))

    (tmp_path / "empty.txt").write_text("\n\n  \n")
    empty = CorpusSource(str(tmp_path / "empty.txt"), sample_by="line")
    assert re.search(r"corpus '.*empty\.txt' is empty", message(lambda: open_corpus(empty)))
    (tmp_path / "empty.jsonl").write_text("")
    assert "is empty" in message(lambda: open_corpus(CorpusSource(str(tmp_path / "empty.jsonl"))))

    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "hello", "id": 1}) + "\n")
    msg = message(lambda: open_corpus(CorpusSource(str(tmp_path / "docs.jsonl"))))
    assert "'text'" in msg and "body" in msg and "text_field" in msg

    (tmp_path / "notes.csv").write_text("a,b\n")
    assert "format" in message(lambda: open_corpus(CorpusSource(str(tmp_path / "notes.csv"))))

    no_eos = _build_tokenizer(tmp_path / "no_eos_tok", eos=False)
    dm = TextDataModule([CorpusSource(write_lines(tmp_path / "t.txt", range(3)))], tokenizer=no_eos)
    assert "no eos token" in message(lambda: dm.setup("fit"))
    dm = TextDataModule([CorpusSource(missing)], tokenizer=tokenizer_dir)
    assert missing in message(lambda: dm.setup("fit"))
    dm = TextDataModule([CorpusSource(str(tmp_path / "t.txt"))])
    assert "data.tokenizer" in message(lambda: dm.setup("fit"))
    assert "weights must be > 0" in message(lambda: open_corpus(CorpusSource(str(tmp_path / "t.txt"), weight=0)))
    assert "seq_len" in message(lambda: TextDataModule([CorpusSource(missing)], seq_len=0))


def test_trainer_resume_sees_the_uninterrupted_batches(tmp_path, tokenizer_dir, caplog):
    """End to end through Lightning: fit 3 steps, checkpoint, resume to 6 == fit 6 steps straight."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            assert "data_cursor" not in batch  # the datamodule keeps it; the model never sees it
            self.seen.append((int(batch["index"]), batch["input_ids"].clone()))
            return self.weight * batch["input_ids"].float().mean()

        def validation_step(self, batch, batch_idx):
            assert batch["input_ids"].shape[1] == 8

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    train = [CorpusSource(write_lines(tmp_path / "train.txt", range(30)), sample_by="line")]
    val = [CorpusSource(write_lines(tmp_path / "val.txt", range(500, 510)), sample_by="line")]

    def fit(max_steps, ckpt_path=None):
        dm = TextDataModule(train, val=val, tokenizer=tokenizer_dir, seq_len=8, batch_size=2, val_max_blocks=3)
        model = Recorder()
        trainer = L.Trainer(
            max_steps=max_steps, val_check_interval=2, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return trainer, dm, model

    _, _, straight = fit(6)
    trainer, dm, first = fit(3)
    assert dm.consumed_batches == 3
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    saved = torch.load(tmp_path / "half.ckpt", weights_only=True)["TextDataModule"]
    assert saved["consumed_batches"] == 3 and saved["cursors"][0][0]["batches"] == 3  # the data position is saved
    with caplog.at_level("INFO"):
        _, dm2, second = fit(6, ckpt_path=tmp_path / "half.ckpt")
    assert "resuming the training stream at batch 3 from the saved data positions" in caplog.text
    assert dm2.consumed_batches == 6
    resumed = first.seen + second.seen
    assert [index for index, _ in resumed] == [index for index, _ in straight.seen] == list(range(6))
    for (_, expected), (_, got) in zip(straight.seen, resumed):
        assert torch.equal(expected, got)


def test_training_batches_carry_document_ids_when_asked(tmp_path, tokenizer_dir, tokenizer):
    train = [CorpusSource(write_lines(tmp_path / "train.txt", range(30)), sample_by="line")]

    def batches(**kw):
        dm = TextDataModule(train, tokenizer=tokenizer_dir, seq_len=16, batch_size=2, seed=1, **kw)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True, max_steps=100)
        dm.setup("fit")
        return take(dm.train_dataloader(), 4)

    plain, marked = batches(), batches(document_ids=True)
    assert "document_ids" not in plain[0]
    eos = tokenizer.eos_token_id
    for a, b in zip(plain, marked):
        assert torch.equal(a["input_ids"], b["input_ids"]) and int(a["index"]) == int(b["index"])
        ids, docs = b["input_ids"], b["document_ids"]
        assert docs.shape == ids.shape and bool((docs[:, 0] == 0).all())
        # a new document starts exactly after each EOS: the id steps by one there and nowhere else
        steps = docs[:, 1:] - docs[:, :-1]
        assert torch.equal(steps, (ids[:, :-1] == eos).long())


# ------------------------------------------------------------------------ resume from saved cursors


class CountingEncoder:
    """A DocumentEncoder that records every text it tokenizes."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.texts = []

    def __call__(self, texts):
        self.texts.extend(texts)
        return self.encoder(texts)


TRICKY = (
    "first line\r\nsecond line\rthird\n\n\nfourth para\nstill fourth\r\n\r\nfifth \u00e9\u00e8 \u4e2d\u6587\n"
    "\n   \n\nsixth\n\n\n\n\nseventh line without end"
)


@pytest.mark.parametrize("sample_by", ["line", "paragraph", "document"])
@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_own_file_reader_reads_what_datasets_reads(tmp_path, monkeypatch, sample_by, chunk):
    from lightning_dlm.data import sources

    monkeypatch.setattr(sources, "_CHUNK", chunk)  # tiny chunks: records and separators cross chunk ends
    (tmp_path / "a.txt").write_bytes(TRICKY.encode())
    (tmp_path / "b.txt").write_bytes(("x\r" * 3 + "\n\ny\n\n").encode() + TRICKY.encode()[::-1].decode("utf-8", "ignore").encode())
    (tmp_path / "c.txt").write_bytes(b"")
    corpus = open_corpus(CorpusSource(str(tmp_path / "*.txt"), sample_by=sample_by))
    reader = sources.LocalFileReader(corpus)
    assert sources.LocalFileReader.supports(corpus, shuffle_buffer=0)
    assert not sources.LocalFileReader.supports(corpus, shuffle_buffer=4)
    ours = list(reader.records(range(3), None))
    expected = [text for texts in corpus.texts() for text in texts]
    assert [text for text, _, _ in ours if text] == [text for text in expected if text]
    # reading from a document's position (or the one after it) reads on as reading through does
    for i, (text, start, after) in enumerate(ours):
        if text:  # cursors only point at documents
            assert [t for t, _, _ in reader.records(range(3), start) if t] == [t for t, _, _ in ours[i:] if t]
            assert [t for t, _, _ in reader.records(range(3), after) if t] == [t for t, _, _ in ours[i + 1:] if t]


def test_own_jsonl_reader_reads_what_datasets_reads(tmp_path):
    from lightning_dlm.data import sources

    rows = [{"id": i, "content": doc_text(i) + (" \u00e9\n\"q\"" if i % 3 else "")} for i in range(20)]
    rows[5]["content"] = ""
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + ("\r\n" if i % 2 else "\n") for i, row in enumerate(rows)))
    corpus = open_corpus(CorpusSource(str(tmp_path / "d.jsonl"), text_field="content"))
    assert sources.LocalFileReader.supports(corpus, shuffle_buffer=0)
    ours = [text for text, _, _ in sources.LocalFileReader(corpus).records([0], None)]
    assert ours == [text for texts in corpus.texts() for text in texts] == [row["content"] for row in rows]


def last_cursors(batches, upto, workers):
    """What the datamodule keeps after consuming batches [0, upto): each worker slot's last cursor."""
    return {int(b["index"]) % workers: b["data_cursor"] for b in batches[:upto]}


def worker_batches(stream, workers, n):
    """Batches ``start_batch ..`` of ``stream`` in counter order, from its workers run in this process."""
    iters = [stream.iter_worker(w) for w in range(workers)]
    return [next(iters[j % workers]) for j in range(n)]


@pytest.mark.parametrize("case", ["split_document", "mixture", "two_workers", "document_ids", "shuffled", "jsonl", "files"])
def test_cursor_resume_is_exact_and_tokenizes_no_consumed_document(tmp_path, encoder, case):
    workers = 2 if case == "two_workers" else 1
    kw = dict(seq_len=16, batch_size=2, seed=5, doc_batch_size=4, num_workers=0)
    if case == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": doc_text(i, 9)}) + "\n" for i in range(400)))
        sources_ = [CorpusSource(str(path))]
    elif case == "files":  # 4 files, 2 slots: file-level sharding, a slot reads on across its files
        for f in range(4):
            write_lines(tmp_path / f"part{f}.txt", range(f * 80, f * 80 + 80), n_words=9)
        sources_ = [CorpusSource(str(tmp_path / "part*.txt"), sample_by="line")]
    else:
        sources_ = [CorpusSource(write_lines(tmp_path / "long.txt", range(400), n_words=9), sample_by="line")]
    if case == "mixture":
        sources_.append(CorpusSource(write_lines(tmp_path / "short.txt", range(5000, 5300), n_words=2), sample_by="line",
                                     weight=0.5))
    if case == "document_ids":
        kw["document_ids"] = True
    if case == "shuffled":
        kw["shuffle_buffer"] = 8  # read through datasets: records before the position are read, not tokenized
    corpora = open_corpora(sources_)

    def make(start=0, cursors=None):
        counting = CountingEncoder(encoder)
        stream = PackedBatchStream(corpora, counting, rank=1, world_size=2, start_batch=start, cursors=cursors, **kw)
        stream.num_workers = workers  # run the workers here, to count their tokenizer calls
        return stream, counting

    stream, full_counting = make()
    full = worker_batches(stream, workers, 40)

    def source_of(text):
        return int(int(re.search(r"doc(\d{4})", text).group(1)) >= 5000)

    def consumed_before(cursors):
        """The documents of the slots' sources before their cursors (the example-level split keeps
        documents i % S == slot of each source; ``seen`` is the cursor's document counter)."""
        S, consumed = 2 * workers, set()
        for local, cursor in cursors.items():
            slot = 1 * workers + local
            for source, state in enumerate(cursor["sources"]):
                assert state["epoch"] == 0
                if workers == 1:  # this slot's documents in its reading order, as the uninterrupted run tokenized them
                    mine = [t for t in full_counting.texts if source_of(t) == source]
                    if case == "files":  # file level: the slot keeps every document of its files
                        consumed |= set(mine[: state["seen"]])
                        assert state["position"][0] in (2, 3)  # rank 1 reads the second half of the files
                    else:
                        consumed |= set(mine[: (state["seen"] - slot + S - 1) // S])
                else:  # unshuffled: document i of a source is its i-th line
                    consumed |= {t for t in full_counting.texts if source_of(t) == source
                                 and int(re.search(r"doc(\d{4})", t).group(1)) - 5000 * source < state["seen"]
                                 and (int(re.search(r"doc(\d{4})", t).group(1)) - 5000 * source) % S == slot}
        assert consumed
        return consumed
    assert [int(b["index"]) for b in full] == list(range(40))
    assert all(s["epoch"] == 0 for b in full for s in b["data_cursor"]["sources"])
    # resume points where the next block starts inside a document (skip > 0)
    split = [n for n in range(6, 34) if all(s["skip"] > 0 for s in full[n - 1]["data_cursor"]["sources"][:1])]
    assert split, "no resume point inside a document"
    for n0 in split[:2] + [34]:
        cursors = last_cursors(full, n0, workers)
        resumed_stream, counting = make(n0, cursors)
        resumed_stream.check_cursors()
        resumed = worker_batches(resumed_stream, workers, 6)
        for expected, got in zip(full[n0:], resumed):
            assert int(got["index"]) == int(expected["index"])
            assert torch.equal(got["input_ids"], expected["input_ids"])
            if "document_ids" in expected:
                assert torch.equal(got["document_ids"], expected["document_ids"])
            assert got["data_cursor"] == expected["data_cursor"]
        # the resume tokenized no document consumed before its cursors (the partly used one at most)
        assert not set(counting.texts) & consumed_before(cursors), f"resume at {n0} re-tokenized consumed documents"
        # ... while regenerating (an old checkpoint without cursors) tokenizes everything consumed
        regen_stream, regen = make(n0)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(worker_batches(regen_stream, workers, 2), resumed))
        assert len(regen.texts) > len(counting.texts)


def test_cursor_resume_through_dataloader_workers_and_the_datamodule(tmp_path, tokenizer_dir):
    a = CorpusSource(write_lines(tmp_path / "a.txt", range(0, 40), n_words=9), sample_by="line", weight=2)
    b = CorpusSource(write_lines(tmp_path / "b.txt", range(100, 140), n_words=3), sample_by="line")

    def make():
        dm = TextDataModule([a, b], tokenizer=tokenizer_dir, seq_len=12, batch_size=3, seed=2, num_workers=2)
        dm.trainer = SimpleNamespace(global_rank=1, world_size=2, training=True, max_steps=100)
        dm.setup("fit")
        return dm

    dm = make()
    full = take(dm.train_dataloader(), 16)
    cursors = [dict(batch["data_cursor"]) for batch in full]
    for batch in full[:9]:
        dm.on_before_batch_transfer(batch, 0)
    state = dm.state_dict()
    assert state["consumed_batches"] == 9 and set(state["cursors"]) == {1}  # rank 1 alone here
    assert state["cursors"][1] == {0: cursors[8], 1: cursors[7]}
    resumed = make()
    resumed.load_state_dict(state)
    for expected, got, cursor in zip(full[9:], take(resumed.train_dataloader(), 7), cursors[9:]):
        assert int(got["index"]) == int(expected["index"])
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert got["data_cursor"] == cursor

    # an older checkpoint (no cursors): regenerated, still exact
    old = make()
    old.load_state_dict({k: v for k, v in state.items() if k not in ("cursors", "cursor_version")})
    for expected, got in zip(full[9:], take(old.train_dataloader(), 3)):
        assert torch.equal(got["input_ids"], expected["input_ids"])


def test_resume_on_a_changed_corpus_is_one_line(tmp_path, tokenizer_dir):
    path = tmp_path / "train.txt"
    write_lines(path, range(60), n_words=9)

    def make():
        dm = TextDataModule([CorpusSource(str(path), sample_by="line")], tokenizer=tokenizer_dir, seq_len=8, batch_size=2)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True, max_steps=100)
        dm.setup("fit")
        return dm

    dm = make()
    for batch in take(dm.train_dataloader(), 20):
        dm.on_before_batch_transfer(batch, 0)
    state = dm.state_dict()
    offset = state["cursors"][0][0]["sources"][0]["position"][1]
    assert offset > 0

    def refused():
        resumed = make()
        resumed.load_state_dict(state)
        with pytest.raises(DLMError) as info:
            resumed.train_dataloader()
        text = str(info.value)
        assert "\n" not in text and str(path) in text
        assert "resume with the original corpus or start a new run" in text
        return text

    original = path.read_bytes()
    path.write_bytes(original[: offset // 2])  # shorter than the saved offset
    assert "does not match the checkpoint's data position" in refused()
    path.write_bytes(original + b"more text appended at the end\n")  # longer
    refused()
    edited = original[:offset - 10] + original[offset - 10:offset].upper() + original[offset:]  # same size, edited
    path.write_bytes(edited)
    refused()
    path.write_bytes(original)  # back to the original: resumes
    resumed = make()
    resumed.load_state_dict(state)
    assert int(next(iter(resumed.train_dataloader()))["index"]) == 20


def test_resume_past_the_end_of_a_datasets_read_corpus_is_one_line(tmp_path, encoder):
    path = write_lines(tmp_path / "t.txt", range(30))
    corpora = open_corpora([CorpusSource(path, sample_by="line")])
    kw = dict(seq_len=8, batch_size=2, shuffle_buffer=4)  # a shuffle buffer: read through datasets
    full = take(DataLoader(PackedBatchStream(corpora, encoder, **kw), batch_size=None), 5)
    cursor = full[3]["data_cursor"]
    assert cursor["sources"][0]["reader"] == "records"
    cursor["sources"][0]["position"] = [999]  # the corpus got shorter than the saved position
    stream = PackedBatchStream(corpora, encoder, start_batch=4, cursors={0: cursor}, **kw)
    with pytest.raises(DLMError) as info:
        next(iter(stream))
    assert "\n" not in str(info.value) and path in str(info.value) and "start a new run" in str(info.value)


def test_both_data_modules_keep_their_resume_state_through_the_shared_base(tmp_path, tokenizer_dir):
    """TextDataModule and SFTDataModule share StreamingDataModule: the state each saves (keys in
    order), a round trip, and each one's own one-line refusal of a changed order setting."""
    from lightning_dlm.data.base import StreamingDataModule
    from lightning_dlm.data.sft import SFTSource
    from lightning_dlm.data.sft_datamodule import SFTDataModule

    corpus = write_lines(tmp_path / "t.txt", range(20))
    records = tmp_path / "sft.jsonl"
    records.write_text("".join(json.dumps(dict(prompt=f"q {i}", response=f"a {i}")) + "\n" for i in range(6)))

    def text(**kw):
        return TextDataModule(train=[CorpusSource(corpus)], tokenizer=tokenizer_dir, seq_len=8, batch_size=2, **kw)

    def sft(**kw):
        return SFTDataModule(train=[SFTSource(path=str(records))], tokenizer=tokenizer_dir, seq_len=16, batch_size=2, **kw)

    assert isinstance(text(), StreamingDataModule) and isinstance(sft(), StreamingDataModule)
    state = text().state_dict()
    assert list(state) == ["consumed_batches", "world_size", "num_workers", "seed", "seq_len", "batch_size",
                           "cursor_version", "cursors"]
    resumed = text()
    resumed.load_state_dict(dict(state, consumed_batches=3))
    assert resumed.consumed_batches == 3
    with pytest.raises(DLMError) as info:
        text(seed=1).load_state_dict(state)
    assert str(info.value) == ("cannot resume the data stream exactly: seed changed from 0 (checkpoint) to 1, and the "
                               "data order depends on it; resume with data/trainer seed=0")

    first = sft()
    first.setup("fit")
    state = first.state_dict()
    assert list(state) == ["consumed_batches", "world_size", "seed", "seq_len", "batch_size", "padding",
                           "bucket_size", "num_examples"] and state["num_examples"] == 6
    resumed = sft()
    resumed.load_state_dict(dict(state, consumed_batches=2))  # sets up to count the examples first
    assert resumed.consumed_batches == 2
    with pytest.raises(DLMError) as info:
        sft(bucket_size=8).load_state_dict(state)
    assert str(info.value) == ("cannot resume the SFT stream exactly: bucket_size changed from 32 (checkpoint) to 8, "
                               "and the example order depends on it; resume with the checkpoint's bucket_size")
    with pytest.raises(DLMError, match=r"^data.seq_len must be >= 2, got 1$"):
        SFTDataModule(train=[SFTSource(path=str(records))], seq_len=1)
    with pytest.raises(DLMError, match=r"^data.seq_len must be >= 2, got 1: with the shift"):
        TextDataModule(train=[CorpusSource(corpus)], seq_len=1)
