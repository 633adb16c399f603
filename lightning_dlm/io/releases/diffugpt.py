"""DiffuGPT-S / DiffuGPT-M (HKUNLP, "Scaling Diffusion Language Models via Adaptation from
Autoregressive Models", ICLR 2025): hub ``diffusionfamily/diffugpt-s``, ``diffusionfamily/diffugpt-m``.

Read from github.com/HKUNLP/DiffuLLaMA: ``model.py`` (``DiscreteDiffusionModel``, a
``PyTorchModelHubMixin``: its safetensors hold ``embed_tokens.weight`` (the GPT-2 ``wte``, its
``lm_head`` tied to it), ``denoise_model.*`` (the GPT-2 ``transformer`` without ``wte``) and
``lm_head.weight`` where not deduplicated; the causal ``attn.bias`` buffers are filled with True, so
attention is bidirectional), ``inf_diffugpt.py`` (``--shift True  # do not change this``: the
logits at i-1 predict token i, the first token kept) and
``LLaMA-Factory/src/llamafactory/model/loader.py`` (the mask: id 10541 for DiffuGPT-S, an added
``[¨M¨]`` at id 50257 for DiffuGPT-M, embeddings resized to the tokenizer). The config.json is the
base GPT-2 config (``model_type: gpt2``), so the release is recognised by its weight names.
Loaded as transformers' ``GPT2LMHeadModel`` with bidirectional attention. EOS: ``<|endoftext|>`` (50256).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from lightning_dlm.io.releases.base import ReleaseLoader, register_release, weight_names

PREFIX = "denoise_model."


@register_release
class DiffuGPT(ReleaseLoader):
    name = "diffugpt"
    title = "DiffuGPT"
    hub_names = ("diffusionfamily/diffugpt-s", "diffusionfamily/diffugpt-m")
    model_types = ("gpt2",)
    target_type = "gpt2"
    tokenizer_class = "GPT2Tokenizer"
    embedding_key = "transformer.wte.weight"

    def matches_layout(self, path: str, config: Dict[str, Any]) -> bool:
        return any(name.startswith(PREFIX) for name in weight_names(path))

    def rename(self, name: str) -> Optional[str]:
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # the causal-mask buffers, not weights
            return None
        if name == "embed_tokens.weight":
            return "transformer.wte.weight"
        if name.startswith(PREFIX):
            return "transformer." + name[len(PREFIX):]
        return name  # lm_head.weight

    def conventions(self, config: Dict[str, Any]) -> Dict[str, Any]:
        return {"shift": True, "attention": "bidirectional"}

    def mask_token(self, path: str, config: Dict[str, Any], tokenizer) -> int:
        if tokenizer.mask_token_id is None:
            raise self.missing_mask(path, "the id 10541 token (DiffuGPT-S) or [¨M¨] (DiffuGPT-M)")
        return tokenizer.mask_token_id
