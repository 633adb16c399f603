"""``SFTDataModule``: instruction-tuning batches for Lightning, resumable batch for batch.

``dlm sft fit --config experiments/sft/smollm2_arith.yaml`` runs the trainer with it (the layout is
described in :mod:`lightning_dlm.data.sft`). The examples are tokenized once in ``setup()``; a batch
is a pure function of its counter, so the resume state is the consumed-batch counter and the
settings the order depends on (saved for the checkpoint, checked on resume).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lightning_dlm.core.errors import DLMError, require
from lightning_dlm.data.packing import load_tokenizer
from lightning_dlm.data.sft import PADDINGS, SFTBatchStream, SFTEncoder, SFTSource, eval_batches

#: Settings the data order depends on; a resume must keep them.
ORDER_KEYS = ("world_size", "seed", "seq_len", "batch_size", "padding", "bucket_size", "num_examples")


class SFTDataModule(L.LightningDataModule):
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
        super().__init__()
        require(seq_len >= 2, f"data.seq_len must be >= 2, got {seq_len}")
        require(batch_size >= 1, f"data.batch_size must be >= 1 (got {batch_size})")
        require(num_workers >= 0, f"data.num_workers must be >= 0 (got {num_workers})")
        require(bucket_size >= 1, f"data.bucket_size must be >= 1 (got {bucket_size})")
        require(padding in PADDINGS, f"unknown data.padding '{padding}': choose one of {', '.join(PADDINGS)}")
        self.train_sources = [s if isinstance(s, SFTSource) else SFTSource(**s) for s in train]
        self.val_sources = [s if isinstance(s, SFTSource) else SFTSource(**s) for s in (val or [])]
        self.tokenizer: Union[str, Any, None] = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.padding = padding
        self.bucket_size = bucket_size
        self.too_long = too_long
        self.template = template
        self.add_bos = add_bos
        self.val_max_examples = val_max_examples
        self._consumed = 0
        self._encoder: Optional[SFTEncoder] = None
        self._train = None
        self._val = None

    @property
    def encoder(self) -> SFTEncoder:
        if self._encoder is None:
            tokenizer = self.tokenizer if not isinstance(self.tokenizer, (str, type(None))) else load_tokenizer(self.tokenizer)
            self._encoder = SFTEncoder(tokenizer, self.seq_len, self.too_long, self.template, self.add_bos)
        return self._encoder

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self._train is None:
            require(len(self.train_sources) > 0, "data.train is empty: give at least one SFT source (path: ...)")
            self._train, stats = self.encoder.encode_all(self.train_sources)
            rank_zero_info(stats.line())
        if stage in (None, "fit", "validate") and self.val_sources and self._val is None:
            examples, stats = self.encoder.encode_all(self.val_sources)
            self._val = examples[: self.val_max_examples]
            rank_zero_info("validation " + stats.line())

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def train_stream(self, start_batch: Optional[int] = None) -> SFTBatchStream:
        if self._train is None:
            self.setup("fit")
        rank, world_size = self._rank_and_world()
        return SFTBatchStream(self._train, self.encoder.eos, self.seq_len, self.batch_size, self.padding, self.bucket_size,
                              self.seed, rank, world_size, self._consumed if start_batch is None else start_batch)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is not None and trainer.max_steps is not None and trainer.max_steps < 0:
            rank_zero_warn("the SFT stream is infinite: set trainer.max_steps (or max_time) to end training")
        if self._consumed:
            rank_zero_info(f"data: resuming the SFT stream at batch {self._consumed}")
        return DataLoader(self.train_stream(), batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self):
        if self.val_sources and self._val is None:
            self.setup("validate")
        if not self._val:
            return []
        batches = eval_batches(self._val, self.encoder.eos, self.seq_len, self.batch_size, self.padding, self.bucket_size)
        return DataLoader(batches, batch_size=None, shuffle=False)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "index" in batch:
            self._consumed = int(batch["index"]) + 1
        return batch

    @property
    def consumed_batches(self) -> int:
        return self._consumed

    def _order_state(self) -> dict[str, Any]:
        _, world_size = self._rank_and_world()
        return {"world_size": world_size, "seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "padding": self.padding, "bucket_size": self.bucket_size,
                "num_examples": len(self._train) if self._train is not None else None}

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_batches": self._consumed, **self._order_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._train is None:
            self.setup("fit")
        current = self._order_state()
        for key in ORDER_KEYS:
            if key in state_dict and state_dict[key] != current[key]:
                raise DLMError(
                    f"cannot resume the SFT stream exactly: {key} changed from {state_dict[key]} (checkpoint) to "
                    f"{current[key]}, and the example order depends on it; resume with the checkpoint's {key}"
                )
        self._consumed = int(state_dict.get("consumed_batches", 0))
