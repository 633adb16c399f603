"""The name the model object had before it held the diffusion config and tokenizer too.

``DiffusionBackbone`` is :class:`lightning_dlm.model.diffusion_model.DiffusionModel`.
"""

from lightning_dlm.model.diffusion_model import Allowed, DiffusionModel, position_ids_from_padding

DiffusionBackbone = DiffusionModel

__all__ = ["Allowed", "DiffusionBackbone", "DiffusionModel", "position_ids_from_padding"]
