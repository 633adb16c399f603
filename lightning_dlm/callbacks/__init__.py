"""Lightning callbacks of lightning_dlm (add them under ``trainer.callbacks`` in a config)."""

from lightning_dlm.callbacks.throughput import TrainingThroughput

__all__ = ["TrainingThroughput"]
