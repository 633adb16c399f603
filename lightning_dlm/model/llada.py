"""LLaDA (GSAI-ML, "Large Language Diffusion Models") as a small transformers model of our own.

transformers has no class with LLaDA's published layout (OLMo-style names and config keys), and
the release's own ``modeling_llada.py`` is remote code, which lightning_dlm never runs. This is
the same network written out plainly, with the published parameter names, so the released
safetensors load unchanged (see :mod:`lightning_dlm.io.releases.llada` for what was read):

    x = wte(ids)
    per block:  h = attn_norm(x);  q, k, v = q_proj(h), k_proj(h), v_proj(h)   (RoPE on q, k)
                x = x + attn_out(softmax(q k^T / sqrt(d_head) + mask) v)        (bidirectional)
                h = ff_norm(x);  x = x + ff_out(silu(ff_proj(h)) * up_proj(h))
    logits = ff_out(ln_f(x))        (or wte^T with weight_tying; / sqrt(d_model) with scale_logits)

RMSNorm is computed in float32, RoPE rotates halves (``cat(-x2, x1)``) at the given positions.
Registered with transformers' public ``AutoConfig.register`` / ``AutoModelForCausalLM.register``
under ``model_type: lightning_dlm_llada``, so ``AutoModelForCausalLM.from_config`` builds it.
Keys and values of a KV cache are not kept (LLaDA samples bidirectionally; a cached sampler is
refused in one line).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from lightning_dlm.core.errors import DLMError
from lightning_dlm.io.releases.llada import LLADA_TYPE

#: published LLaDA options this class implements, and the value it needs
SUPPORTED = {"block_type": "llama", "layer_norm_type": "rms", "rope": True, "alibi": False,
             "attention_layer_norm": False, "input_emb_norm": False, "activation_type": "silu", "include_bias": False}


class LLaDAConfig(PretrainedConfig):
    """The published LLaDA config keys (``d_model``, ``n_heads``, ...), with the usual names as aliases."""

    model_type = LLADA_TYPE
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers",
                     "num_key_value_heads": "n_kv_heads", "max_position_embeddings": "max_sequence_length"}

    def __init__(self, d_model: int = 4096, n_heads: int = 32, n_kv_heads: Optional[int] = None, n_layers: int = 32,
                 mlp_hidden_size: Optional[int] = None, mlp_ratio: int = 4, vocab_size: int = 126464,
                 embedding_size: Optional[int] = None, rms_norm_eps: float = 1e-5, rope_theta: float = 10000.0,
                 max_sequence_length: int = 4096, weight_tying: bool = False, include_qkv_bias: bool = False,
                 scale_logits: bool = False, init_std: float = 0.02, block_type: str = "llama",
                 layer_norm_type: str = "rms", rope: bool = True, alibi: bool = False, attention_layer_norm: bool = False,
                 input_emb_norm: bool = False, activation_type: str = "silu", include_bias: bool = False, **kwargs):
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.n_kv_heads = n_kv_heads or n_heads
        self.mlp_hidden_size = mlp_hidden_size if mlp_hidden_size is not None else mlp_ratio * d_model
        self.mlp_ratio = mlp_ratio
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size or vocab_size
        self.rms_norm_eps, self.rope_theta, self.max_sequence_length = rms_norm_eps, rope_theta, max_sequence_length
        self.weight_tying, self.include_qkv_bias, self.scale_logits = weight_tying, include_qkv_bias, scale_logits
        self.init_std = init_std
        self.block_type, self.layer_norm_type, self.rope, self.alibi = block_type, layer_norm_type, rope, alibi
        self.attention_layer_norm, self.input_emb_norm = attention_layer_norm, input_emb_norm
        self.activation_type, self.include_bias = activation_type, include_bias
        kwargs.setdefault("tie_word_embeddings", bool(weight_tying))
        super().__init__(**kwargs)

    def check(self) -> "LLaDAConfig":
        for key, wanted in SUPPORTED.items():
            if getattr(self, key) != wanted:
                raise DLMError(f"this LLaDA config sets {key}: {getattr(self, key)!r}; lightning_dlm's LLaDA class "
                               f"implements the released LLaDA-8B layout ({key}: {wanted!r}) only")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise DLMError(f"LLaDA config: d_model {self.d_model} / n_heads {self.n_heads} / n_kv_heads "
                           f"{self.n_kv_heads} do not divide: the config is damaged")
        return self


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """RoPE of (B, H, L, D) queries and keys at ``positions`` (B, L), computed in float32."""
    dim = q.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=q.device, dtype=torch.float32) / dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, L, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, D)
    cos, sin = angles.cos(), angles.sin()
    q32, k32 = q.float(), k.float()
    return ((q32 * cos + rotate_half(q32) * sin).to(q.dtype), (k32 * cos + rotate_half(k32) * sin).to(k.dtype))


def attention_bias(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """SDPA's ``attn_mask`` of what DiffusionModel passes: None, a (B, L) padding mask (1 = token),
    a boolean (B, 1, L, L) pattern or an additive float (B, 1, L, L) mask."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise DLMError("lightning_dlm's LLaDA class takes dense attention masks: use attn_implementation: sdpa")
    if mask.dim() == 2:
        return mask.bool()[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask
    return mask.to(dtype)


class LLaDABlock(nn.Module):
    """One LLaMA-style block under LLaDA's names."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, hidden = config.d_model, config.mlp_hidden_size
        head = d // config.n_heads
        bias = config.include_qkv_bias
        self.n_heads, self.n_kv_heads, self.theta = config.n_heads, config.n_kv_heads, config.rope_theta
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, config.n_kv_heads * head, bias=bias)
        self.v_proj = nn.Linear(d, config.n_kv_heads * head, bias=bias)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.ff_out = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        batch, length, d = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(batch, length, self.n_heads, -1).transpose(1, 2)
        k = self.k_proj(h).view(batch, length, self.n_kv_heads, -1).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.n_kv_heads, -1).transpose(1, 2)
        q, k = rope(q, k, positions, self.theta)
        repeat = self.n_heads // self.n_kv_heads
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(batch, length, d))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAPreTrainedModel(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def check_no_cache(cache, use_cache) -> None:
    if cache is not None or use_cache:
        raise DLMError("lightning_dlm's LLaDA class keeps no KV cache (LLaDA samples bidirectionally): "
                       "sample without a cache (no --cache / cache: none)")


class LLaDAModel(LLaDAPreTrainedModel):
    """The decoder: ``transformer.{wte, blocks, ln_f}`` (and ``ff_out``, the LM head, as published)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        config.check()
        parts = dict(wte=nn.Embedding(config.embedding_size, config.d_model),
                     blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                     ln_f=RMSNorm(config.d_model, config.rms_norm_eps))
        if not config.weight_tying:
            parts["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.transformer = nn.ModuleDict(parts)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache=None, use_cache: Optional[bool] = None,
                **kwargs) -> BaseModelOutputWithPast:
        check_no_cache(cache, use_cache)
        x = self.transformer.wte(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
        bias = attention_bias(attention_mask, x.dtype)
        for block in self.transformer.blocks:
            x = block(x, position_ids, bias)
        return BaseModelOutputWithPast(last_hidden_state=self.transformer.ln_f(x))


class LLaDAForCausalLM(LLaDAPreTrainedModel):
    """``model`` (:class:`LLaDAModel`) and its head: logits (B, L, V) of every position."""

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def get_decoder(self):
        return self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache=None, use_cache: Optional[bool] = None,
                logits_to_keep=None, **kwargs) -> CausalLMOutputWithPast:
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                            use_cache=use_cache).last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden.index_select(1, logits_to_keep.to(hidden.device))
        if self.config.weight_tying:
            logits = F.linear(hidden, self.model.transformer.wte.weight)
        else:
            logits = self.model.transformer.ff_out(hidden)
        if self.config.scale_logits:
            logits = logits / math.sqrt(self.config.d_model)
        return CausalLMOutputWithPast(logits=logits)


AutoConfig.register(LLADA_TYPE, LLaDAConfig, exist_ok=True)
AutoModelForCausalLM.register(LLaDAConfig, LLaDAForCausalLM, exist_ok=True)
