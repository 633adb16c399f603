"""Corpus sources: what to read, and how to open it as a streaming ``datasets`` corpus.

A :class:`CorpusSource` names one corpus (local files or a hub dataset). :func:`open_corpus`
resolves it, opens it with ``datasets.load_dataset(..., streaming=True)`` and checks early that it
exists and holds text, so that a typo fails at ``setup()`` with a one-line :class:`DLMError`
instead of deep inside a DataLoader worker.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence

import datasets

from lightning_dlm.errors import DLMError, require

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
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DLMError(
                f"cannot open hub dataset '{source.path}' (name={source.name}, split={source.split}): "
                f"{first_line}; check the name, config and split, and that the hub is reachable"
            ) from err
    files = resolve_files(source.path)
    builder = infer_format(source.path, files) if source.format == "auto" else source.format
    kwargs = {"sample_by": source.sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    except StopIteration as err:  # e.g. the json builder on an empty file, while inferring features
        raise empty_corpus_error(source) from err
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DLMError(f"cannot read corpus '{source.path}' as {builder}: {first_line}; check the file or set format") from err


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
