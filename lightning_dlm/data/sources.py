"""Corpus sources: what to read, and how to open it as a streaming ``datasets`` corpus.

A :class:`CorpusSource` names one corpus (local files or a hub dataset). :func:`open_corpus`
resolves it, opens it with ``datasets.load_dataset(..., streaming=True)`` and checks early that it
exists and holds text, so that a typo fails at ``setup()`` with a one-line :class:`DLMError`
instead of deep inside a DataLoader worker.
"""

from __future__ import annotations

import glob
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence

import datasets

from lightning_dlm.core.errors import DLMError, first_line, require
from lightning_dlm.core.seeding import epoch_seed

#: File extension -> ``datasets`` packaged builder, for ``format: auto``.
EXTENSION_FORMATS = {
    ".txt": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
#: Compression suffixes that ``datasets`` opens transparently; stripped before the lookup above.
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")


@dataclass
class CorpusSource:
    """One training, validation or test corpus.

    Attributes:
        path: A local file, glob or directory of files; or a hub dataset name when ``format`` is
            ``"hub"``.
        format: ``"auto"`` infers it from the file extension (``.txt``/``.md`` -> text,
            ``.json``/``.jsonl`` -> json, ``.parquet`` -> parquet).
        weight: Mixture weight, normalised over the sources of one split.
        text_field: The column holding the text (json, parquet and hub corpora).
        name: Hub configuration name.
        split: Hub split.
        sample_by: For text files, what one document is: a whole file, a paragraph (text between
            blank lines) or a line.
    """

    path: str
    format: Literal["auto", "text", "json", "parquet", "hub"] = "auto"
    weight: float = 1.0
    text_field: str = "text"
    name: Optional[str] = None
    split: str = "train"
    sample_by: Literal["document", "paragraph", "line"] = "document"


@dataclass
class Corpus:
    """An opened :class:`CorpusSource`: the lazy streaming dataset plus what is needed to read it."""

    source: CorpusSource
    dataset: datasets.IterableDataset
    weight: float
    #: The local data files (sorted) and their ``datasets`` builder; ``None`` for a hub corpus.
    files: Optional[list] = None
    builder: Optional[str] = None

    @property
    def label(self) -> str:
        """How error messages name this corpus."""
        return self.source.path

    @property
    def text_field(self) -> str:
        return self.source.text_field

    def texts(self, dataset: Optional[datasets.IterableDataset] = None, batch_size: int = 64) -> Iterator[list]:
        """Yield the raw text column in batches of up to ``batch_size`` documents.

        Iterates ``dataset`` (default: the whole corpus) with ``IterableDataset.iter``, which, unlike
        ``iter(dataset)``, does not split the shards among DataLoader workers on its own: the
        training stream assigns documents to workers itself (see :mod:`lightning_dlm.data.stream`).
        """
        dataset = self.dataset if dataset is None else dataset
        batches = dataset.iter(batch_size=batch_size)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except UnicodeDecodeError as err:
                raise DLMError(
                    f"corpus '{self.source.path}' is not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at "
                    f"offset {err.start} of a chunk cannot be decoded): convert it, e.g. "
                    f"iconv -f latin1 -t utf-8 IN > OUT"
                ) from None
            if self.text_field not in batch:
                raise missing_field_error(self.source, list(batch))
            yield batch[self.text_field]


def is_document(text: object) -> bool:
    """True for a text that holds anything but whitespace (empty lines etc. are skipped)."""
    return isinstance(text, str) and bool(text) and not text.isspace()


def missing_field_error(source: CorpusSource, columns: Sequence[str]) -> DLMError:
    return DLMError(
        f"corpus '{source.path}' has no text field '{source.text_field}' (its columns: "
        f"{', '.join(columns) or 'none'}); set text_field to the column that holds the text"
    )


def resolve_files(path: str) -> list[str]:
    """The sorted data files named by a file, a directory (its non-hidden files, recursively) or a glob."""
    expanded = os.path.expanduser(path)
    if os.path.isfile(expanded):
        return [expanded]
    if os.path.isdir(expanded):
        files = [
            os.path.join(root, name)
            for root, dirs, names in os.walk(expanded)
            for name in names
            if not name.startswith(".")
        ]
        dirs_note = "directory"
    elif glob.has_magic(expanded):
        files = [f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f)]
        dirs_note = "glob"
    else:
        raise DLMError(f"corpus file '{path}' does not exist; check the path (a file, a directory or a glob)")
    require(bool(files), f"corpus {dirs_note} '{path}' matches no files; check the path or the pattern")
    return sorted(files)


def infer_format(path: str, files: Sequence[str]) -> str:
    """The ``datasets`` builder for ``files``, from their extensions (all must agree)."""
    formats = set()
    for file in files:
        stem = file
        for suffix in COMPRESSION_SUFFIXES:
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        ext = os.path.splitext(stem)[1].lower()
        if ext not in EXTENSION_FORMATS:
            raise DLMError(
                f"cannot tell the format of '{file}' (corpus '{path}') from its extension; "
                f"set format: text, json or parquet"
            )
        formats.add(EXTENSION_FORMATS[ext])
    require(
        len(formats) == 1,
        f"corpus '{path}' mixes formats ({', '.join(sorted(formats))}); split it into one source per format "
        f"or set format explicitly",
    )
    return formats.pop()


def load_streaming(source: CorpusSource) -> datasets.IterableDataset:
    """Open ``source`` lazily with ``datasets.load_dataset(..., streaming=True)``."""
    if source.format == "hub":
        try:
            return datasets.load_dataset(source.path, source.name, split=source.split, streaming=True)
        except Exception as err:  # the hub raises many types; the user needs one line either way
            first = first_line(err)
            raise DLMError(
                f"cannot open hub dataset '{source.path}' (name={source.name}, split={source.split}): "
                f"{first}; check the name, config and split, and that the hub is reachable"
            ) from err
    files = resolve_files(source.path)
    builder = infer_format(source.path, files) if source.format == "auto" else source.format
    kwargs = {"sample_by": source.sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    except StopIteration as err:  # e.g. the json builder on an empty file, while inferring features
        raise empty_corpus_error(source) from err
    except Exception as err:
        raise DLMError(f"cannot read corpus '{source.path}' as {builder}: {first_line(err)}; check the file or set format") from err


def empty_corpus_error(source: CorpusSource) -> DLMError:
    return DLMError(
        f"corpus '{source.path}' is empty (no document with any text); check the path"
        + (f" and text_field '{source.text_field}'" if source.format != "text" else "")
    )


def open_corpus(source: CorpusSource, weight: Optional[float] = None) -> Corpus:
    """Open ``source`` and check it early: the files exist, the text field exists, some text exists.

    Only the beginning of the stream is read (up to the first non-empty document), so this stays
    cheap for hub-scale corpora.
    """
    require(source.weight > 0, f"corpus '{source.path}' has weight {source.weight}; weights must be > 0")
    corpus = Corpus(source=source, dataset=load_streaming(source), weight=source.weight if weight is None else weight)
    if source.format != "hub":
        corpus.files = resolve_files(source.path)
        corpus.builder = infer_format(source.path, corpus.files) if source.format == "auto" else source.format
    features = corpus.dataset.features
    if features is not None and source.text_field not in features:
        raise missing_field_error(source, list(features))
    if count_documents(corpus, limit=1) == 0:
        raise empty_corpus_error(source)
    return corpus


def count_documents(corpus: Corpus, limit: int) -> int:
    """Count non-empty documents from the start of ``corpus``, stopping at ``limit``."""
    count = 0
    for texts in corpus.texts(batch_size=min(max(limit, 1), 64)):
        count += sum(1 for text in texts if is_document(text))
        if count >= limit:
            return limit
    return count


def open_corpora(sources: Sequence[CorpusSource]) -> list[Corpus]:
    """Open several sources; their weights are normalised to sum to one."""
    require(len(sources) > 0, "a corpus list is empty; give at least one source (path: ...)")
    opened = [open_corpus(source) for source in sources]
    total = sum(corpus.weight for corpus in opened)
    for corpus in opened:
        corpus.weight = corpus.weight / total
    return opened


# ----------------------------------------------------------------------------------- record readers
#
# The training stream reads a source as "records" (raw examples: a line, a paragraph, a file, a JSON
# line, a hub row) and needs to restart reading at a saved position without re-reading what came
# before (see lightning_dlm.data.stream, "Resume design"). A reader yields, for one epoch of one
# data slot, ``(text, start, after)``: the record's text and the positions of the record and of
# the record after it. Positions are short lists of ints (they travel in batches and checkpoints).

#: What separates records in a local file, matched on the raw bytes. Text files are split on the
#: universal newlines ``\r\n``, ``\r`` and ``\n`` (what ``datasets``' text builder reads them
#: with); a paragraph ends at two newlines in a row; JSON Lines at ``\n``.
_LINE_END = re.compile(rb"\r\n|\r(?!\n)|\n")
_PARAGRAPH_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n){2}")
_JSONL_END = re.compile(rb"\n")
#: Bytes read per chunk (extended to the end of the line).
_CHUNK = 1 << 20
#: Bytes before a saved offset whose checksum a resume compares (detects a changed corpus).
_CHECK_BYTES = 64


class LocalFileReader:
    """Our own reader of local, uncompressed text (``.txt``/``.md``, any ``sample_by``) and JSON
    Lines (``.jsonl``) files, seekable in O(1): a position is ``[file index, byte offset]``.

    It yields the same texts in the same order as ``datasets``' text and json builders (checked
    by the tests), so switching readers does not change the data order. Reading from a position
    seeks there (``file.seek``) and reads nothing before it.
    """

    kind = "bytes"

    def __init__(self, corpus: "Corpus"):
        self.corpus = corpus
        self.files = list(corpus.files or [])
        self._sizes: dict = {}
        self.mode = "jsonl" if corpus.builder == "json" else corpus.source.sample_by

    @staticmethod
    def supports(corpus: "Corpus", shuffle_buffer: int) -> bool:
        if shuffle_buffer > 0 or not corpus.files or corpus.source.format == "hub":
            return False
        if any(f.endswith(COMPRESSION_SUFFIXES) for f in corpus.files):
            return False
        if corpus.builder == "text":
            return True
        return corpus.builder == "json" and all(f.lower().endswith(".jsonl") for f in corpus.files)

    def slot_files(self, num_slots: int, slot: int, file_level: bool) -> list[int]:
        """The file indices slot ``slot`` reads: like ``datasets``' ``shard(contiguous=True)``."""
        n = len(self.files)
        if not file_level or num_slots == 1:
            return list(range(n))
        per = n // num_slots
        return list(range(slot * per, (slot + 1) * per))

    def records(self, files: Sequence[int], start: Optional[Sequence[int]]) -> Iterator[tuple]:
        first_file, first_offset = (files[0] if files else 0, 0) if start is None else (int(start[0]), int(start[1]))
        for index in files:
            if index < first_file:
                continue
            yield from self._file_records(index, first_offset if index == first_file else 0)

    def _file_records(self, index: int, offset: int) -> Iterator[tuple]:
        path = self.files[index]
        with open(path, "rb") as fh:
            fh.seek(offset)
            if self.mode == "document":
                if offset == 0:
                    data = fh.read()
                    yield self._text(data, path, 0), [index, 0], [index, len(data)]
                return
            end = _LINE_END if self.mode == "line" else _PARAGRAPH_END if self.mode == "paragraph" else _JSONL_END
            carry, base = b"", offset  # base: the file offset of carry[0]
            while True:
                chunk = fh.read(_CHUNK)
                if chunk and not chunk.endswith(b"\n"):
                    chunk += fh.readline()
                data = carry + chunk if carry else chunk
                pos = 0
                for match in end.finditer(data):
                    yield self._text(data[pos:match.start()], path, base + pos), [index, base + pos], [index, base + match.end()]
                    pos = match.end()
                carry, base = data[pos:], base + pos
                if not chunk:
                    if carry:
                        yield self._text(carry, path, base), [index, base], [index, base + len(carry)]
                    return

    def _text(self, raw: bytes, path: str, offset: int) -> object:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DLMError(
                f"corpus '{self.corpus.source.path}' is not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at "
                f"offset {offset + err.start} of {path}): convert it, e.g. iconv -f latin1 -t utf-8 IN > OUT"
            ) from None
        if self.mode == "jsonl":
            if not text.strip():
                return None
            try:
                row = json.loads(text)
            except ValueError as err:
                raise DLMError(f"corpus file '{path}' has a line that is not JSON at byte {offset}: {err}") from None
            return row.get(self.corpus.text_field) if isinstance(row, dict) else None
        return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text

    def fingerprint(self, position: Sequence[int]) -> dict:
        """What a resume checks a saved position against, O(1): the number of files, the file's
        size and a checksum of the bytes just before the position (an edit of the same length
        elsewhere in the file goes unnoticed)."""
        index, offset = int(position[0]), int(position[1])
        if index not in self._sizes:
            self._sizes[index] = os.path.getsize(self.files[index])
        return {"num_files": len(self.files), "size": self._sizes[index], "check": position_check(self.files[index], offset)}

    def check_position(self, position: Sequence[int], saved: dict) -> None:
        """Refuse, in one line, a saved position that does not fit the corpus files as they are now."""
        index, offset = int(position[0]), int(position[1])
        label = self.corpus.source.path
        if saved.get("num_files") != len(self.files) or index >= len(self.files):
            raise DLMError(
                f"cannot resume the data stream: corpus '{label}' now has {len(self.files)} file(s), the checkpoint's "
                f"data position was saved with {saved.get('num_files')}; resume with the original corpus or start a new run"
            )
        path = self.files[index]
        size = os.path.getsize(path)
        if offset > size or saved.get("size") != size or saved.get("check") != position_check(path, offset):
            raise DLMError(
                f"cannot resume the data stream: corpus file '{path}' does not match the checkpoint's data position "
                f"(byte {offset}; the file has {size} bytes, {saved.get('size')} when it was saved); resume with the "
                f"original corpus or start a new run"
            )


def position_check(path: str, offset: int) -> int:
    """Checksum of the bytes just before ``offset`` in ``path`` (0 at the start of a file)."""
    if offset <= 0:
        return 0
    with open(path, "rb") as fh:
        begin = max(0, offset - _CHECK_BYTES)
        fh.seek(begin)
        return zlib.crc32(fh.read(offset - begin))


class DatasetsReader:
    """Reader of the other sources (hub datasets, parquet, ``.json``, compressed files, and any
    source read with a shuffle buffer) through ``datasets`` streaming: a position is
    ``[record number in this epoch's stream]``. Reading from position ``p`` reads and discards the
    first ``p`` raw records of the epoch; it tokenizes none of them (the slow part), but it does
    read them."""

    kind = "records"

    def __init__(self, corpus: "Corpus", shuffle_buffer: int = 0, seed: int = 0, source_index: int = 0,
                 doc_batch_size: int = 64):
        self.corpus = corpus
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.source_index = source_index
        self.doc_batch_size = doc_batch_size

    def epoch_dataset(self, epoch: int, num_slots: int, slot: int, file_level: bool):
        dataset = self.corpus.dataset
        if file_level and num_slots > 1:
            dataset = dataset.shard(num_shards=num_slots, index=slot)
        if self.shuffle_buffer > 0:
            dataset = dataset.shuffle(seed=epoch_seed(self.seed, epoch, self.source_index), buffer_size=self.shuffle_buffer)
        return dataset

    def records(self, dataset, start: Optional[Sequence[int]]) -> Iterator[tuple]:
        skip = 0 if start is None else int(start[0])
        count = 0
        for texts in self.corpus.texts(dataset, batch_size=self.doc_batch_size):
            for text in texts:
                if count >= skip:
                    yield text, [count], [count + 1]
                count += 1
        if count < skip:
            raise DLMError(
                f"cannot resume the data stream: corpus '{self.corpus.source.path}' has {count} records in this pass, "
                f"the checkpoint's data position is record {skip}; resume with the original corpus or start a new run"
            )
