"""Fast-dLLM v2 1.5B / 7B (NVIDIA, "Fast-dLLM v2: Efficient Block-Diffusion LLM"): hub
``Efficient-Large-Model/Fast_dLLM_v2_1.5B``, ``Efficient-Large-Model/Fast_dLLM_v2_7B``.

Read from the files published with the 7B weights (a copy in github.com/Satgoy152/DualDiffusion
``FastDLLM_inferencing/Fast_dLLM_v2_7B/``): ``config.json`` (``model_type: Fast_dLLM_Qwen``,
``architectures: [Fast_dLLM_QwenForCausalLM]``, Qwen2.5 keys, ``bd_size: 32``,
``conplemenrary_mask: true`` as spelled there, ``eos_token_id`` 151645), the weight index
(``model.layers.N.self_attn.{q,k,v}_proj`` with bias: the Qwen2 layout), ``added_tokens.json`` /
``special_tokens_map.json`` (``|<MASK>|`` at 151665, an additional special token), ``modeling.py``
(``block_diff_mask``: bidirectional inside blocks of ``bd_size``, causal across them, over
[x_t, x_0]; complementary masks; the loss is transformers' causal-LM loss, labels shifted: the
hidden state at i-1 predicts token i) and the model card ("Token Shift Mechanism", block size 32,
base Qwen2.5-Instruct). Loaded as transformers' ``Qwen2ForCausalLM`` in our block mode.
EOS: ``<|im_end|>`` (151645).
"""

from __future__ import annotations

from typing import Any, Dict

from lightning_dlm.io.releases.base import ReleaseLoader, register_release

MASK = "|<MASK>|"


@register_release
class FastDLLMv2(ReleaseLoader):
    name = "fast_dllm_v2"
    title = "Fast-dLLM v2"
    hub_names = ("Efficient-Large-Model/Fast_dLLM_v2_1.5B", "Efficient-Large-Model/Fast_dLLM_v2_7B")
    model_types = ("Fast_dLLM_Qwen",)
    architectures = ("Fast_dLLM_QwenForCausalLM",)
    target_type = "qwen2"
    tokenizer_class = "Qwen2Tokenizer"

    def hf_config(self, config: Dict[str, Any]) -> Dict[str, Any]:
        out = super().hf_config(config)
        for key in ("bd_size", "conplemenrary_mask"):
            out.pop(key, None)
        return out

    def conventions(self, config: Dict[str, Any]) -> Dict[str, Any]:
        return {"shift": True, "attention": "block", "block_size": int(config.get("bd_size", 32)),
                "complementary_masks": bool(config.get("conplemenrary_mask", True))}

    def mask_token(self, path: str, config: Dict[str, Any], tokenizer) -> int:
        return self.mask_by_token(path, tokenizer, MASK, 151665)
