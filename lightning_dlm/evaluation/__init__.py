"""Evaluation: the paper's protocols (likelihood bound, multiple choice by diffusion loss,
generation tasks, generative perplexity) for diffusion checkpoints and AR baselines, the
``dlm eval`` runner, and an lm-evaluation-harness adapter (:mod:`.harness`)."""

from lightning_dlm.evaluation.evaluators import CausalEvaluator, DiffusionEvaluator, load_evaluator
from lightning_dlm.evaluation.runner import EvalConfig, ModelSpec, run_evaluation, table
from lightning_dlm.evaluation.tasks import TASKS, build_task

__all__ = ["CausalEvaluator", "DiffusionEvaluator", "load_evaluator", "EvalConfig", "ModelSpec", "run_evaluation",
           "table", "TASKS", "build_task"]
