"""lightning_dlm: adapt pretrained autoregressive LMs into masked diffusion LMs.

``lightning_dlm.DiffusionModel`` is the model object every part loads and runs
(:mod:`lightning_dlm.model.diffusion_model`); it is imported on first use, so ``import
lightning_dlm`` stays light.
"""

__all__ = ["DiffusionModel"]


def __getattr__(name):
    if name == "DiffusionModel":
        from lightning_dlm.model.diffusion_model import DiffusionModel

        return DiffusionModel
    raise AttributeError(f"module 'lightning_dlm' has no attribute {name!r}")
