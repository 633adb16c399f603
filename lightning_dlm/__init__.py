"""lightning_dlm: adapt pretrained autoregressive LMs into masked diffusion LMs."""
