"""Model adapter: any Hugging Face causal LM as a masked-diffusion denoiser."""

from lightning_dlm.model.config import BackboneConfig, MaskTokenConfig
from lightning_dlm.model.diffusion_model import DiffusionModel, position_ids_from_padding
from lightning_dlm.model.loading import load_causal_lm, load_tokenizer, max_positions, resolve_hf_config
from lightning_dlm.model.mask_token import provide_mask_token

__all__ = [
    "BackboneConfig", "DiffusionModel", "MaskTokenConfig", "load_causal_lm", "load_tokenizer",
    "max_positions", "position_ids_from_padding", "provide_mask_token", "resolve_hf_config",
]
