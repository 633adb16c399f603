"""dllm's Tiny-A2D Qwen3 models (github.com/ZHZisZZ/dllm, "AR-to-diffusion"): hub
``dllm-hub/Qwen3-0.6B-diffusion-mdlm-v0.1`` (MDLM) and ``dllm-hub/Qwen3-0.6B-diffusion-bd3lm-v0.1``
(BD3LM, block diffusion).

Read from github.com/ZHZisZZ/dllm: ``dllm/pipelines/a2d/models/qwen3/modeling_qwen3.py``
(``A2DQwen3Config``: ``Qwen3Config`` with ``model_type: a2d-qwen3``; ``A2DQwen3LMHeadModel``:
``Qwen3ForCausalLM``'s weights with a padding-only, bidirectional mask; the published config names
them in ``auto_map``, which is not followed here), ``dllm/pipelines/a2d/
convert.py`` (the Qwen3 weights copied unchanged, ``auto_map`` / ``architectures`` dropped),
``dllm/utils/models.py`` (``get_tokenizer``: ``<|mask|>`` added as the mask token, ``<|im_end|>``
the end of turn), ``dllm/core/trainers/mdlm.py`` (``right_shift_logits: False``: no shift),
``dllm/core/trainers/bd3lm.py`` (``block_size`` 32, EOS padding to a whole block) and
``examples/a2d/README.md`` (``block_size=32`` for the BD3LM model). Both publish the same config, so
the BD3LM model is told apart by its name (``bd3lm`` in the folder's path or hub name). Loaded as
transformers' ``Qwen3ForCausalLM``: bidirectional (MDLM) or in our block mode (BD3LM).

The BD3LM trainer places blocks on positions 0, B, 2B, ... of each sequence (block id = position
// B) and reads slot i from position i (no shift); our block decoder keeps that alignment. dllm's
``dllm/core/samplers/bd3lm.py`` instead left-pads the prompt to whole blocks (block ids on the
padded columns, RoPE positions unpadded), so its first generated block begins at the prompt's end;
the two agree when the prompt's length is a multiple of the block size.
"""

from __future__ import annotations

import os
from typing import Any, Dict

from lightning_dlm.io.releases.base import ReleaseLoader, register_release

MASK = "<|mask|>"


class TinyA2D(ReleaseLoader):
    model_types = ("a2d-qwen3",)
    architectures = ("A2DQwen3LMHeadModel",)
    target_type = "qwen3"
    tokenizer_class = "Qwen2Tokenizer"
    block = False

    def matches_layout(self, path: str, config: Dict[str, Any]) -> bool:
        return ("bd3lm" in os.path.abspath(path).lower()) == self.block

    def mask_token(self, path: str, config: Dict[str, Any], tokenizer) -> int:
        return self.mask_by_token(path, tokenizer, MASK)


@register_release
class TinyA2DMDLM(TinyA2D):
    name = "tiny_a2d_mdlm"
    title = "Tiny-A2D MDLM"
    hub_names = ("dllm-hub/Qwen3-0.6B-diffusion-mdlm-v0.1",)

    def conventions(self, config: Dict[str, Any]) -> Dict[str, Any]:
        return {"shift": False, "attention": "bidirectional"}


@register_release
class TinyA2DBD3LM(TinyA2D):
    name = "tiny_a2d_bd3lm"
    title = "Tiny-A2D BD3LM"
    hub_names = ("dllm-hub/Qwen3-0.6B-diffusion-bd3lm-v0.1",)
    block = True

    def conventions(self, config: Dict[str, Any]) -> Dict[str, Any]:
        return {"shift": False, "attention": "block", "block_size": 32}
