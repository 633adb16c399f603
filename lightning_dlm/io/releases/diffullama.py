"""DiffuLLaMA-7B (HKUNLP, "Scaling Diffusion Language Models via Adaptation from Autoregressive
Models", ICLR 2025): hub ``diffusionfamily/diffullama``.

Read from github.com/HKUNLP/DiffuLLaMA: ``inf_diffullama.py`` (the folder loads with
``LlamaForCausalLM.from_pretrained``: standard LLaMA-2 weights and config; ``--shift True  # do not
change this``; the mask is ``tokenizer.mask_token_id``), ``attention_patch.py`` / ``model.py``
(a full, non-causal attention mask), ``DiffuLLaMA-training/train.py`` (``--mask_token`` default 811,
an existing token reused) and ``LLaMA-Factory/.../loader.py`` (mask id 811 when the tokenizer names
none). Its config.json is a plain ``LlamaConfig``: the release is recognised by a LLaMA folder whose
LLaMA tokenizer (``tokenizer_class`` LlamaTokenizer[Fast]) names a mask token (a plain LLaMA
tokenizer has none). A LLaMA-shaped model with a tokenizer of its own that reserves a mask token
(such as experiments/micro/model, a plain causal LM) is not taken for it. Loaded as transformers'
``LlamaForCausalLM`` with bidirectional attention. EOS: ``</s>`` (2).
"""

from __future__ import annotations

import os
from typing import Any, Dict

from lightning_dlm.io.releases.base import ReleaseLoader, read_json, register_release


@register_release
class DiffuLLaMA(ReleaseLoader):
    name = "diffullama"
    title = "DiffuLLaMA"
    hub_names = ("diffusionfamily/diffullama",)
    model_types = ("llama",)
    target_type = "llama"
    tokenizer_class = "LlamaTokenizer"

    def matches_layout(self, path: str, config: Dict[str, Any]) -> bool:
        tokenizer_config = read_json(os.path.join(path, "tokenizer_config.json")) or {}
        special = read_json(os.path.join(path, "special_tokens_map.json")) or {}
        if tokenizer_config.get("tokenizer_class") not in ("LlamaTokenizer", "LlamaTokenizerFast"):
            return False
        return bool(tokenizer_config.get("mask_token") or special.get("mask_token"))

    def conventions(self, config: Dict[str, Any]) -> Dict[str, Any]:
        return {"shift": True, "attention": "bidirectional"}

    def mask_token(self, path: str, config: Dict[str, Any], tokenizer) -> int:
        if tokenizer.mask_token_id is None or tokenizer.mask_token_id >= len(tokenizer):
            raise self.missing_mask(path, "its reused mask token", 811)
        return tokenizer.mask_token_id
