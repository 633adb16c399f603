"""The diffusion backbone: a Hugging Face causal LM run with diffusion attention masks.

The wrapped model is switched to bidirectional attention through its config
(``config.is_causal = False``, which transformers' mask builders honour); partial (annealing)
masks are passed as 4-D masks, which transformers forwards to the attention kernels unchanged:
an additive float mask for ``sdpa`` / ``eager``, a FlexAttention ``BlockMask`` for
``flex_attention`` (see :mod:`lightning_dlm.model.flex_masks`). No transformers internals are
patched.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, PreTrainedModel

from lightning_dlm.diffusion.annealing import AnnealMask, additive_attention_mask
from lightning_dlm.errors import DLMError
from lightning_dlm.model.config import BackboneConfig
from lightning_dlm.model.flex_masks import FLEX, check_flex_call, check_flex_support, flex_block_mask
from lightning_dlm.model.loading import load_causal_lm, load_tokenizer, max_positions, resolve_hf_config
from lightning_dlm.model.mask_token import provide_mask_token
from lightning_dlm.model.sharded_loading import build_empty_causal_lm

Allowed = Union[AnnealMask, torch.Tensor, None]


# Config attributes of model families that transform the logits after the LM head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")


def position_ids_from_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded row sees the same positions as alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class DiffusionBackbone(nn.Module):
    """Wraps any ``AutoModelForCausalLM`` as the denoiser of a masked diffusion LM.

    ``forward(input_ids, attention_mask=None, allowed=None, document_ids=None)`` returns logits
    (B, L, V): ``allowed`` None = full bidirectional attention (the fast kernel path); an
    :class:`~lightning_dlm.diffusion.annealing.AnnealMask` = that annealing mask (dense for
    sdpa / eager, evaluated inside the kernel for flex_attention); an (L, L) or (B, L, L) boolean
    ``allowed[q, k]`` = that dense pattern (e.g. causal). ``attention_mask`` (B, L), 1 for real
    tokens, handles padding in every case; ``document_ids`` (B, L) keeps attention within each
    document of packed rows.
    """

    def __init__(self, model: PreTrainedModel, mask_token_id: int, mask_token_added: bool):
        super().__init__()
        self.model = model
        self.mask_token_id = int(mask_token_id)
        self.mask_token_added = bool(mask_token_added)
        # A diffusion LM attends both ways: transformers builds bidirectional masks from this flag.
        self.model.config.is_causal = False

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: BackboneConfig, tokenizer=None, seed: int = 0, empty: bool = False) -> "DiffusionBackbone":
        """Load (or build) the causal LM of ``cfg`` and provide its mask token.

        ``tokenizer`` is modified in place when a mask token is added. ``empty``: build the
        architecture with its parameters on the meta device and load nothing (for sharded
        loading: :mod:`lightning_dlm.model.sharded_loading` fills the weights in after FSDP wraps).
        """
        if cfg.attn_implementation == FLEX:
            hf_config = resolve_hf_config(cfg)
            check_flex_support(MODEL_FOR_CAUSAL_LM_MAPPING.get(type(hf_config), None), hf_config)
        model = build_empty_causal_lm(cfg) if empty else load_causal_lm(cfg)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mask_id, added = provide_mask_token(model, tokenizer, cfg.mask_token, seed)
        return cls(model, mask_id, added)

    # --- properties -------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def max_positions(self) -> Optional[int]:
        return max_positions(self.model.config)

    @property
    def attn_implementation(self) -> str:
        return self.model.config._attn_implementation

    # --- forward ----------------------------------------------------------------------------
    def _mask_dtype(self) -> torch.dtype:
        if torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype() if self.model.device.type == "cuda" else torch.get_autocast_cpu_dtype()
        return self.model.dtype

    @property
    def row_logits_exact(self) -> bool:
        """Whether ``lm_head(hidden_states(...))`` equals the model's logits (no soft-capping or
        scaling of the logits after the head), so the head may run on selected rows only."""
        cfg = self.model.config
        transformed = any(getattr(cfg, key, None) not in (None, 1, 1.0) for key in _LOGIT_TRANSFORMS)
        return not transformed and self.model.get_output_embeddings() is not None

    def _attention_mask(self, input_ids, attention_mask, allowed: Allowed, document_ids):
        """The mask argument transformers gets: 2-D padding (bidirectional fast path), a 4-D
        additive float mask (sdpa / eager) or a BlockMask (flex_attention)."""
        impl = self.attn_implementation
        if impl == FLEX:
            check_flex_call(self.model, input_ids.device)
            return flex_block_mask(*input_ids.shape, allowed, attention_mask, document_ids, device=input_ids.device)
        if allowed is None and document_ids is None:
            return attention_mask
        if impl == "flash_attention_2":
            raise DLMError(
                "flash_attention_2 takes no attention mask, so it cannot anneal or separate documents: "
                "use attn_implementation: flex_attention (or sdpa), or anneal_steps: 0"
            )
        if isinstance(allowed, AnnealMask):
            allowed = allowed.dense(input_ids.shape[1], input_ids.device)
        return additive_attention_mask(allowed, attention_mask, dtype=self._mask_dtype(), document_ids=document_ids)

    def _inputs(self, input_ids, attention_mask, allowed: Allowed, document_ids=None) -> dict:
        length = input_ids.shape[1]
        limit = self.max_positions
        if limit is not None and length > limit:
            raise DLMError(
                f"sequence length {length} is above the model's position limit {limit}: lower seq_len / the target length"
            )
        mask = self._attention_mask(input_ids, attention_mask, allowed, document_ids)
        position_ids = position_ids_from_padding(attention_mask) if attention_mask is not None else None
        return dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        allowed: Allowed = None,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return self.model(**self._inputs(input_ids, attention_mask, allowed, document_ids)).logits

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        allowed: Allowed = None,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Last hidden states (B, L, H): the decoder without the LM head (see :meth:`lm_head`)."""
        inputs = self._inputs(input_ids, attention_mask, allowed, document_ids)
        return self.model.get_decoder()(**inputs).last_hidden_state

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states of any shape (..., H); exact when :attr:`row_logits_exact`."""
        return self.model.get_output_embeddings()(hidden)
