"""LLaDA-8B (GSAI-ML / Renmin University, "Large Language Diffusion Models"): hub
``GSAI-ML/LLaDA-8B-Base``, ``GSAI-ML/LLaDA-8B-Instruct``.

Read from the modeling code published with the weights (copies in github.com/ZHZisZZ/dllm
``dllm/pipelines/llada/models/`` and github.com/NVlabs/Fast-dLLM ``llada/model/``) and from
github.com/ML-GSAI/LLaDA: ``configuration_llada.py`` / the published config.json (``model_type:
llada``, ``architectures: [LLaDAModelLM]``, OLMo-style keys ``d_model``, ``n_heads``, ``n_kv_heads``,
``n_layers``, ``mlp_hidden_size``, ``block_type: llama``, ``layer_norm_type: rms``, ``rope``,
``weight_tying: false``, ``mask_token_id`` 126336, ``eos_token_id`` / ``pad_token_id`` 126081),
``modeling_llada.py`` (``model.transformer.{wte, blocks.N.{attn_norm, q_proj, k_proj, v_proj,
attn_out, ff_norm, ff_proj, up_proj, ff_out}, ln_f, ff_out}``; attention always bidirectional) and
``generate.py`` / ``get_log_likelihood.py`` (``logits[mask_index]`` scored against
``seq[mask_index]``: no shift). transformers has no class of this layout, so it is loaded as
:class:`lightning_dlm.model.llada.LLaDAForCausalLM` (registered as ``lightning_dlm_llada``); the
tokenizer is the published ``tokenizer.json`` with ``<|mdm_mask|>`` at 126336. EOS:
``<|endoftext|>`` (126081; the instruct model ends turns with ``<|eot_id|>``, 126348).
"""

from __future__ import annotations

from typing import Any, Dict

from lightning_dlm.io.releases.base import ReleaseLoader, register_release

MASK = "<|mdm_mask|>"
#: the model_type our own LLaDA class is registered under (lightning_dlm.model.llada)
LLADA_TYPE = "lightning_dlm_llada"


@register_release
class LLaDA(ReleaseLoader):
    name = "llada"
    title = "LLaDA"
    hub_names = ("GSAI-ML/LLaDA-8B-Base", "GSAI-ML/LLaDA-8B-Instruct")
    model_types = ("llada",)
    architectures = ("LLaDAModelLM",)
    target_type = LLADA_TYPE
    embedding_key = "model.transformer.wte.weight"

    def conventions(self, config: Dict[str, Any]) -> Dict[str, Any]:
        return {"shift": False, "attention": "bidirectional"}

    def mask_token(self, path: str, config: Dict[str, Any], tokenizer) -> int:
        return self.mask_at_id(path, tokenizer, MASK, int(config.get("mask_token_id", 126336)))
