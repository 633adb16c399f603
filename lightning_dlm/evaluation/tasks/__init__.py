"""The evaluation tasks, by name (``TASKS``; :func:`build_task` makes one from a spec).

* :mod:`.registry`: ``TASKS``, :func:`register_task`, :func:`build_task`;
* :mod:`.builtin`: likelihood, multiple choice, LAMBADA, short answer, infilling, generative perplexity;
* :mod:`.sft`: GSM8K and HumanEval infilling, for instruction-tuned models.
"""

from lightning_dlm.evaluation.tasks import builtin, sft  # noqa: F401  (each module registers its tasks)
from lightning_dlm.evaluation.tasks.builtin import Bar, Task
from lightning_dlm.evaluation.tasks.registry import TASKS, build_task, register_task

__all__ = ["Bar", "TASKS", "Task", "build_task", "register_task"]
