"""``StreamingDataModule``: what the training data modules share.

Both :class:`~lightning_dlm.data.datamodule.TextDataModule` (packed pretraining text) and
:class:`~lightning_dlm.data.sft_datamodule.SFTDataModule` (instruction tuning) feed Lightning an
infinite per-rank stream of batches, each with its ``index`` (its counter on the rank), and resume
it exactly. This base holds the common part:

* the shared options (``tokenizer``, ``seq_len``, ``batch_size``, ``num_workers``, ``seed``) and
  their checks; the encoder, built on first use;
* the rank and world size (0 and 1 without a trainer);
* the training DataLoader over ``train_stream()`` (set up on first use, started at the resume
  point), with a warning when training has no end;
* the resume bookkeeping: the consumed batches counted in ``on_before_batch_transfer`` (after
  the Trainer's prefetch), the ``state_dict`` of the counter and of the settings the order
  depends on (``ORDER_KEYS``), and ``load_state_dict``, which refuses a resume whose order
  would differ, in one line (``ORDER_CHANGED``).

A subclass gives its own options and checks, ``setup``, the encoder (``_build_encoder``), the
stream (``_make_stream``), its evaluation loaders and, where its stream has them, saved
positions (``_keep_cursor``, ``_position_state``, ``_load_position_state``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Tuple, Union

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from lightning_dlm.core.errors import DLMError, require


class StreamingDataModule(L.LightningDataModule):
    """A resumable stream of training batches per rank (see the module docstring).

    Class attributes a subclass sets:
        ORDER_KEYS: the settings the batch order depends on, in the order ``state_dict`` lists them.
        STREAM: the stream's name in messages (``the {STREAM} stream is infinite``).
        ORDER_CHANGED: the refusal of a resume that changed an order setting, formatted with
            ``key``, ``saved`` (the checkpoint's value) and ``current``.
        SEQ_LEN_NOTE: what follows the ``data.seq_len must be >= 2`` error.
    """

    ORDER_KEYS: ClassVar[Tuple[str, ...]] = ("world_size", "seed", "seq_len", "batch_size")
    STREAM: ClassVar[str] = "training"
    ORDER_CHANGED: ClassVar[str] = ("cannot resume the {stream} stream exactly: {key} changed from {saved} (checkpoint) "
                                    "to {current}; resume with the checkpoint's {key}")
    SEQ_LEN_NOTE: ClassVar[str] = ""

    def __init__(self, tokenizer: Optional[str], seq_len: int, batch_size: int, num_workers: int, seed: int):
        super().__init__()
        require(seq_len >= 2, f"data.seq_len must be >= 2, got {seq_len}{self.SEQ_LEN_NOTE}")
        require(batch_size >= 1, f"data.batch_size must be >= 1 (got {batch_size})")
        require(num_workers >= 0, f"data.num_workers must be >= 0 (got {num_workers})")
        self.tokenizer: Union[str, Any, None] = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._consumed = 0
        self._encoder: Any = None
        self._train: Any = None

    # ------------------------------------------------------------------ setup

    @property
    def encoder(self) -> Any:
        """The encoder (tokenizer and layout), built on first use."""
        if self._encoder is None:
            self._encoder = self._build_encoder()
        return self._encoder

    def _build_encoder(self) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------ dataloaders

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def train_stream(self, start_batch: Optional[int] = None) -> IterableDataset:
        """The training stream of this rank, starting at ``start_batch`` (default: the resume point)."""
        if self._train is None:
            self.setup("fit")
        rank, world_size = self._rank_and_world()
        resume = start_batch is None
        return self._make_stream(rank, world_size, self._consumed if resume else start_batch, resume)

    def _make_stream(self, rank: int, world_size: int, start_batch: int, resume: bool) -> IterableDataset:
        """The stream from ``start_batch``; ``resume``: from the resume point (its saved positions too)."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is not None and trainer.max_steps is not None and trainer.max_steps < 0:
            rank_zero_warn(f"the {self.STREAM} stream is infinite: set trainer.max_steps (or max_time) to end training")
        if self._consumed:
            rank_zero_info(f"data: resuming the {self.STREAM} stream at batch {self._consumed}{self._resume_note()}")
        return DataLoader(self.train_stream(), batch_size=None, num_workers=self.num_workers, persistent_workers=False)

    def _resume_note(self) -> str:
        """What follows the resume message (how the stream gets back to its position)."""
        return ""

    # ----------------------------------------------------------------- resume

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count training batches as they reach the model (after the Trainer's prefetch); a batch's
        ``data_cursor`` (its stream position, if the stream saves them) leaves it here, the model
        never sees it."""
        cursor = batch.pop("data_cursor", None) if isinstance(batch, dict) else None
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "index" in batch:
            index = int(batch["index"])
            self._consumed = index + 1
            if cursor is not None:
                self._keep_cursor(index, cursor)
        return batch

    def _keep_cursor(self, index: int, cursor: dict) -> None:
        """Keep the stream position after consumed batch ``index`` (streams that save positions)."""

    @property
    def consumed_batches(self) -> int:
        """Training batches consumed on this rank: where a resumed stream starts."""
        return self._consumed

    def _order_value(self, key: str) -> Any:
        if key == "world_size":
            return self._rank_and_world()[1]
        return getattr(self, key)

    def _order_state(self) -> dict[str, Any]:
        return {key: self._order_value(key) for key in self.ORDER_KEYS}

    def _position_state(self) -> dict[str, Any]:
        """What ``state_dict`` saves besides the counter and the order settings."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The resume point: consumed batches and the order settings (and any saved positions).

        Called by Lightning on every rank when it saves a checkpoint."""
        return {"consumed_batches": self._consumed, **self._order_state(), **self._position_state()}

    def _prepare_resume(self) -> None:
        """Whatever the order settings need before they are compared on resume."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the resume point; refuse a resume whose data order would differ."""
        self._prepare_resume()
        current = self._order_state()
        for key in self.ORDER_KEYS:
            if key in state_dict and state_dict[key] != current[key]:
                raise DLMError(self.ORDER_CHANGED.format(stream=self.STREAM, key=key, saved=state_dict[key],
                                                         current=current[key]))
        self._consumed = int(state_dict.get("consumed_batches", 0))
        self._load_position_state(state_dict)

    def _load_position_state(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``_position_state`` saved."""
