"""What a run trains: one :class:`Objective` per ``model.objective`` (and ``diffusion.attention``),
each owning its training terms and its evaluation NLL.

* ``diffusion`` (:mod:`~lightning_dlm.objectives.diffusion`): bidirectional masked diffusion, with
  attention annealing; under ``diffusion.attention: block`` the block objective
  (:mod:`~lightning_dlm.objectives.block`).
* ``ar`` (:mod:`~lightning_dlm.objectives.ar`): the causal LM baseline.

``build_objective(name, diffusion_cfg, seed, val_t_levels)`` picks one from the registry
(``register_objective``, ``OBJECTIVES``).
"""

from lightning_dlm.objectives.ar import CausalObjective, causal_terms
from lightning_dlm.objectives.base import (
    OBJECTIVES,
    GridObjective,
    Objective,
    StepTerms,
    build_objective,
    register_objective,
)
from lightning_dlm.objectives.block import BlockObjective, block_loss_terms
from lightning_dlm.objectives.diffusion import DiffusionObjective

__all__ = [
    "OBJECTIVES", "BlockObjective", "CausalObjective", "DiffusionObjective", "GridObjective", "Objective", "StepTerms",
    "block_loss_terms", "build_objective", "causal_terms", "register_objective",
]
