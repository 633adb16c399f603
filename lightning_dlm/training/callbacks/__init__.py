"""Lightning callbacks of lightning_dlm (add them under ``trainer.callbacks`` in a config; ``dlm fit``
adds its :class:`StepCheckpoint` itself, set through the ``checkpoint.*`` keys)."""

from lightning_dlm.training.callbacks.checkpointing import StepCheckpoint
from lightning_dlm.training.callbacks.progress import StepProgress
from lightning_dlm.training.callbacks.throughput import TrainingThroughput

__all__ = ["StepCheckpoint", "StepProgress", "TrainingThroughput"]
