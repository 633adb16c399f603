"""``SFTDataModule``: instruction-tuning batches for Lightning, resumable batch for batch.

``dlm sft fit --config experiments/sft/smollm2_arith.yaml`` runs the trainer with it (the layout is
described in :mod:`lightning_dlm.data.sft`). The examples are tokenized once in ``setup()``; a batch
is a pure function of its counter, so the resume state is the consumed-batch counter and the
settings the order depends on (saved for the checkpoint, checked on resume): the bookkeeping of
:class:`~lightning_dlm.data.base.StreamingDataModule`, which it shares with the pretraining module.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_dlm.core.errors import require
from lightning_dlm.data.base import StreamingDataModule
from lightning_dlm.data.packing import load_tokenizer
from lightning_dlm.data.sft import PADDINGS, SFTBatchStream, SFTEncoder, SFTSource, eval_batches

#: Settings the data order depends on; a resume must keep them.
ORDER_KEYS = ("world_size", "seed", "seq_len", "batch_size", "padding", "bucket_size", "num_examples")


class SFTDataModule(StreamingDataModule):
    """Prompt/response or chat records in the paper's SFT layout.

    Training batches: ``dict(input_ids, prompt_mask, index)``; validation: ``dict(input_ids,
    prompt_mask)``. See :mod:`lightning_dlm.data.sft` for the layout.

    Args:
        train: training record sources (``.jsonl`` files or hub datasets).
        val: validation sources (none: no validation).
        tokenizer: tokenizer folder or hub name (linked from the model by the CLI).
        seq_len: the longest example, in tokens.
        batch_size: examples per batch (per rank).
        num_workers: DataLoader workers for training.
        seed: example order.
        padding: ``bucket`` (the batch's longest example rounded up to ``bucket_size``) or ``fixed`` (``seq_len``).
        bucket_size: bucket granularity in tokens.
        too_long: ``cut`` examples longer than ``seq_len`` from the response side, or ``refuse`` them.
        template: ``plain`` or ``chat`` rendering of prompt/response records (messages always use the chat template).
        add_bos: start plain examples with BOS.
        val_max_examples: validation examples kept.
    """

    ORDER_KEYS = ORDER_KEYS
    STREAM = "SFT"
    ORDER_CHANGED = ("cannot resume the SFT stream exactly: {key} changed from {saved} (checkpoint) to {current}, "
                     "and the example order depends on it; resume with the checkpoint's {key}")
    _encoder: Optional[SFTEncoder]

    def __init__(
        self,
        train: list[SFTSource],
        val: Optional[list[SFTSource]] = None,
        tokenizer: Optional[str] = None,
        seq_len: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        padding: Literal["bucket", "fixed"] = "bucket",
        bucket_size: int = 32,
        too_long: Literal["cut", "refuse"] = "cut",
        template: Literal["plain", "chat"] = "plain",
        add_bos: bool = True,
        val_max_examples: int = 256,
    ):
        super().__init__(tokenizer, seq_len, batch_size, num_workers, seed)
        require(bucket_size >= 1, f"data.bucket_size must be >= 1 (got {bucket_size})")
        require(padding in PADDINGS, f"unknown data.padding '{padding}': choose one of {', '.join(PADDINGS)}")
        self.train_sources = [s if isinstance(s, SFTSource) else SFTSource(**s) for s in train]
        self.val_sources = [s if isinstance(s, SFTSource) else SFTSource(**s) for s in (val or [])]
        self.padding = padding
        self.bucket_size = bucket_size
        self.too_long = too_long
        self.template = template
        self.add_bos = add_bos
        self.val_max_examples = val_max_examples
        self._val = None

    def _build_encoder(self) -> SFTEncoder:
        tokenizer = self.tokenizer if not isinstance(self.tokenizer, (str, type(None))) else load_tokenizer(self.tokenizer)
        return SFTEncoder(tokenizer, self.seq_len, self.too_long, self.template, self.add_bos)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self._train is None:
            require(len(self.train_sources) > 0, "data.train is empty: give at least one SFT source (path: ...)")
            self._train, stats = self.encoder.encode_all(self.train_sources)
            rank_zero_info(stats.line())
        if stage in (None, "fit", "validate") and self.val_sources and self._val is None:
            examples, stats = self.encoder.encode_all(self.val_sources)
            self._val = examples[: self.val_max_examples]
            rank_zero_info("validation " + stats.line())

    def _make_stream(self, rank: int, world_size: int, start_batch: int, resume: bool) -> SFTBatchStream:
        return SFTBatchStream(self._train, self.encoder.eos, self.seq_len, self.batch_size, self.padding, self.bucket_size,
                              self.seed, rank, world_size, start_batch)

    def val_dataloader(self):
        if self.val_sources and self._val is None:
            self.setup("validate")
        if not self._val:
            return []
        batches = eval_batches(self._val, self.encoder.eos, self.seq_len, self.batch_size, self.padding, self.bucket_size)
        return DataLoader(batches, batch_size=None, shuffle=False)

    def _order_value(self, key: str) -> Any:
        if key == "num_examples":
            return len(self._train) if self._train is not None else None
        return super()._order_value(key)

    def _prepare_resume(self) -> None:
        """The examples are counted (``num_examples``) before the order settings are compared."""
        if self._train is None:
            self.setup("fit")
