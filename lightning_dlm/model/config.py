"""Plain configuration records of the model adapter (parsed by the CLI from YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional


@dataclass
class MaskTokenConfig:
    """How the absorbing [MASK] token is provided.

    ``mode: auto`` (the default) applies the mask-token rule of
    :func:`lightning_dlm.model.mask_token.provide_mask_token`: ``id`` if given, else ``token`` if the
    vocabulary holds it, else the tokenizer's own unused mask or reserved token (Gemma's
    ``<mask>``, Llama-3's ``<|reserved_special_token_0|>``, ...), else ``token`` is added.
    ``mode: add`` appends a new token (embedding rows resized where the matrix has no spare row; the
    new row initialised at the mean of the old rows, plus Gaussian noise of std ``init_noise_std``).
    ``mode: reuse`` takes an existing vocabulary entry, by ``id`` or by ``token`` string (the paper
    reused GPT-2 id 10541 and LLaMA id 811).
    """

    mode: Literal["auto", "add", "reuse"] = "auto"
    token: str = "<|mask|>"
    id: Optional[int] = None
    init_noise_std: float = 0.0


@dataclass
class LoraOptions:
    """LoRA adapters through ``peft`` (``model.backbone.lora``): only the adapters and the mask-token
    embedding row train; ``dlm export`` merges them into the weights.

    Args:
        r: adapter rank. alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: names (suffixes) of the linear modules that get adapters.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class BackboneConfig:
    """Which causal LM to adapt and how to load it.

    Args:
        pretrained: hub name or local folder of a causal LM (weights are loaded from it).
        config: with ``pretrained`` unset, a full transformers config (with ``model_type``) to
            build a randomly initialised model; with ``pretrained`` set, overrides of its config.
        from_scratch: take the architecture of ``pretrained`` but initialise it randomly.
        tokenizer: hub name or folder of the tokenizer (default: ``pretrained``).
        attn_implementation: ``sdpa`` (default), ``eager``, ``flex_attention`` or
            ``flash_attention_2``. ``flex_attention`` (PyTorch FlexAttention, through transformers)
            anneals without a dense L x L mask: the annealing mask is evaluated inside the kernel;
            it needs CUDA to train (PyTorch has no CPU backward for it) and a model family that
            transformers runs with FlexAttention (LLaMA, Qwen2, Mistral, ...; not GPT-2).
            ``flash_attention_2`` takes no mask, so it cannot anneal.
        dtype: dtype of the weights (``float32``, ``bfloat16``, ``float16``); mixed precision is
            the Trainer's ``precision``.
        mask_token: see :class:`MaskTokenConfig`.
        gradient_checkpointing: recompute activations in the backward pass.
        trust_remote_code: passed to transformers for models with custom code.
        lora: train LoRA adapters (and the mask-token row) instead of every weight (see :class:`LoraOptions`).
        allow_missing: weight names (``fnmatch`` patterns) that may be missing from, or left unused in,
            ``pretrained``'s files; any other missing, unexpected or mis-shaped weight is an error, so a
            wrong folder never trains a randomly initialised network without a word.
        compile: compile each decoder layer with ``torch.compile`` for training (regional compilation,
            :mod:`lightning_dlm.model.compiled`); the weights and checkpoints are the eager model's.
        kernels: ``plain`` (transformers' own modules) or ``liger``: Liger-Kernel's fused RMSNorm and
            SwiGLU modules and its fused linear cross-entropy on the scored rows
            (:mod:`lightning_dlm.model.fused_kernels`; CUDA only, ``pip install lightning_dlm[liger]``).
    """

    pretrained: Optional[str] = None
    config: Optional[Dict[str, Any]] = None
    from_scratch: bool = False
    tokenizer: Optional[str] = None
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = "sdpa"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    mask_token: MaskTokenConfig = field(default_factory=MaskTokenConfig)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    lora: Optional[LoraOptions] = None
    allow_missing: Optional[List[str]] = None
    compile: bool = False
    kernels: Literal["plain", "liger"] = "plain"

    @property
    def tokenizer_source(self) -> Optional[str]:
        return self.tokenizer or self.pretrained
