"""The data layer: corpora -> tokenized, packed blocks -> sharded, exactly resumable batches.

* :mod:`.sources`: :class:`CorpusSource`, opening corpora through ``datasets`` (streaming), and the
  record readers the training stream resumes from a saved position (byte offsets for local files);
* :mod:`.packing`: tokenize documents (+ EOS) and pack them into ``seq_len`` blocks;
* :mod:`.stream`: the per-rank training stream (sharding over ranks x workers, mixture, resume
  from saved cursors);
* :mod:`.base`: :class:`~.base.StreamingDataModule`, what the data modules share (options, resume
  bookkeeping, the training loader);
* :mod:`.datamodule`: :class:`TextDataModule`, the LightningDataModule;
* :mod:`.sft` and :mod:`.sft_datamodule`: instruction-tuning examples and ``SFTDataModule``.
"""

from typing import TYPE_CHECKING

from lightning_dlm.data.sources import CorpusSource

if TYPE_CHECKING:
    from lightning_dlm.data.datamodule import TextDataModule

__all__ = ["CorpusSource", "TextDataModule"]


def __getattr__(name: str):
    # Lazy: only the datamodule needs Lightning; sources, packing and stream stay importable without it.
    if name == "TextDataModule":
        from lightning_dlm.data.datamodule import TextDataModule

        return TextDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
