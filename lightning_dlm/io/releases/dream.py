"""Dream-7B (HKU NLP / Huawei, "Dream 7B: Diffusion Large Language Models"): hub
``Dream-org/Dream-v0-Base-7B``, ``Dream-org/Dream-v0-Instruct-7B``.

Read from the modeling code published with the weights (copies in github.com/ZHZisZZ/dllm
``dllm/pipelines/dream/models/`` and github.com/NVlabs/Fast-dLLM ``dream/model/``):
``configuration_dream.py`` (``model_type: Dream``, Qwen2.5 keys, ``mask_token_id`` 151666,
``pad/bos/eos`` 151643, ``tie_word_embeddings: false``), ``modeling_dream.py`` (``DreamModel``:
``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v}_proj`` with bias and ``o_proj`` without,
``mlp.{gate,up,down}_proj``, RMSNorm, RoPE, ``lm_head``: the Qwen2 layout; SDPA with
``is_causal=False``, hard coded), ``generation_utils.py`` (``logits = cat([logits[:, :1],
logits[:, :-1]])``: the logits at i-1 predict token i, the shift) and ``tokenization_dream.py``
(a Qwen2 byte-level BPE over vocab.json / merges.txt, named through ``auto_map``; the mask token
``<|mask|>``). Loaded as transformers' ``Qwen2ForCausalLM`` with bidirectional attention and
transformers' ``Qwen2Tokenizer``. EOS: ``<|endoftext|>`` (151643).
"""

from __future__ import annotations

from typing import Any, Dict

from lightning_dlm.io.releases.base import ReleaseLoader, register_release

MASK = "<|mask|>"


@register_release
class Dream(ReleaseLoader):
    name = "dream"
    title = "Dream"
    hub_names = ("Dream-org/Dream-v0-Base-7B", "Dream-org/Dream-v0-Instruct-7B")
    model_types = ("Dream",)
    architectures = ("DreamModel",)
    target_type = "qwen2"
    tokenizer_class = "Qwen2Tokenizer"

    def hf_config(self, config: Dict[str, Any]) -> Dict[str, Any]:
        out = super().hf_config(config)
        out.pop("mask_token_id", None)
        return out

    def conventions(self, config: Dict[str, Any]) -> Dict[str, Any]:
        return {"shift": True, "attention": "bidirectional"}

    def mask_token(self, path: str, config: Dict[str, Any], tokenizer) -> int:
        return self.mask_at_id(path, tokenizer, MASK, int(config.get("mask_token_id", 151666)))
