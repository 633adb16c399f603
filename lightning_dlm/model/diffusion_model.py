"""``DiffusionModel``: the one object that is a diffusion LM.

It holds a Hugging Face causal LM switched to bidirectional attention (``config.is_causal =
False``, which transformers' mask builders honour; annealing masks are passed as 4-D masks,
which transformers forwards to the attention kernels unchanged: an additive float mask for
``sdpa`` / ``eager``, a FlexAttention ``BlockMask`` for ``flex_attention``), the diffusion
config (schedule, shift, annealing kind), the mask token and the tokenizer. No transformers
internals are patched. Every part of lightning_dlm runs the model through it:

* :meth:`forward`: full logits (B, L, V) under any attention pattern (``allowed``);
* :meth:`scored_logits`: logits of selected rows only (the LM head runs on those rows when it
  alone gives the model's logits, checked numerically once: :meth:`check_row_logits`);
* :meth:`cached_forward`: explicit positions, past keys/values and the positions whose logits
  are wanted, as the sampler's KV caches need.

``DiffusionModel.from_pretrained(path)`` loads a folder written by ``dlm export`` /
:meth:`save_pretrained`, a ``.ckpt`` or a sharded checkpoint folder written by ``dlm fit``, or a
hub name of an exported model; :meth:`save_pretrained` writes the export format, which plain
``transformers`` still loads (bidirectionally).

    from lightning_dlm import DiffusionModel
    from lightning_dlm.sampling import generate
    model = DiffusionModel.from_pretrained("runs/smollm2_shakespeare/checkpoints/last.ckpt")
    print(generate(model, ["ROMEO."], length=32).texts[0])
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, PreTrainedModel

from lightning_dlm.core.annealing import AnnealMask, additive_attention_mask, causal_allowed
from lightning_dlm.core.blocks import block_attention_allowed, block_mask_mod, block_positions
from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.core.loss import drop_logit, drop_logit_ce
from lightning_dlm.core.schedules import NoiseSchedule, get_schedule
from lightning_dlm.model.config import BackboneConfig
from lightning_dlm.model.flex_masks import FLEX, block_mask_from_mod, check_flex_call, check_flex_support, flex_block_mask
from lightning_dlm.model.hf_compat import cache_keyword, enable_activation_checkpointing, returned_cache
from lightning_dlm.model.loading import load_causal_lm, mask_token_config, max_positions, resolve_hf_config
from lightning_dlm.model.mask_token import provide_mask_token
from lightning_dlm.model.pretrained import load_model, save_model
from lightning_dlm.model.sharded_loading import build_empty_causal_lm

Allowed = Union[AnnealMask, torch.Tensor, None]


def _row_logits_at(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N, K) float32 logits of the LM head ``head`` (a linear layer) for hidden states (N, H) at the
    token ids ``ids`` (N, K) only."""
    z = torch.einsum("nh,nkh->nk", hidden.float(), head.weight[ids].float())
    bias = getattr(head, "bias", None)
    return z if bias is None else z + bias[ids].float()


def position_ids_from_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded row sees the same positions as alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class DiffusionModel(nn.Module):
    """A masked diffusion LM made of any ``AutoModelForCausalLM`` (see the module docstring).

    ``forward(input_ids, attention_mask=None, allowed=None, document_ids=None)`` returns logits
    (B, L, V): ``allowed`` None = full bidirectional attention (the fast kernel path); an
    :class:`~lightning_dlm.core.annealing.AnnealMask` = that annealing mask (dense for
    sdpa / eager, evaluated inside the kernel for flex_attention); an (L, L) or (B, L, L) boolean
    ``allowed[q, k]`` = that dense pattern (e.g. causal). ``attention_mask`` (B, L), 1 for real
    tokens, handles padding in every case; ``document_ids`` (B, L) keeps attention within each
    document of packed rows.

    Args:
        model: the transformers causal LM (its config is switched to bidirectional attention).
        mask_token_id: the absorbing [MASK] id; ``mask_token_added``: whether it was added.
        diffusion: the diffusion config (schedule, shift, ...); defaults to :class:`DiffusionConfig`.
        tokenizer: the tokenizer (with the mask token), needed for text in / text out.
        info: what an export records beside the weights (seed, val_t_levels, tokens_seen, ...).
        attn_implementation: the attention kernel ``model`` was built with (``sdpa``, ``eager``,
            ``flex_attention``, ...); default: the one transformers picks for a model built
            without asking for one (``sdpa`` where the family has it, else ``eager``).
    """

    def __init__(self, model: PreTrainedModel, mask_token_id: int, mask_token_added: bool,
                 diffusion: Optional[DiffusionConfig] = None, tokenizer=None, info: Optional[Dict[str, Any]] = None,
                 attn_implementation: Optional[str] = None):
        super().__init__()
        self.model = model
        # transformers keeps the kernel a model runs in a private config field only: recorded here (see the property)
        self._attn = attn_implementation or model.get_correct_attn_implementation(None)
        self.mask_token_id = int(mask_token_id)
        self.mask_token_added = bool(mask_token_added)
        self.diffusion = diffusion if diffusion is not None else DiffusionConfig()
        self.diffusion.subs_on(self.mask_token_added)  # subs: true with a reused mask token is refused in one line
        self.tokenizer = tokenizer
        self.info: Dict[str, Any] = dict(info or {})
        self._row_logits_exact: Optional[bool] = None  # decided by check_row_logits
        # whether the model computes its LM head at chosen positions only (decided once, not per step)
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_keyword = cache_keyword(model)  # cache= (transformers 5.24) or past_key_values= (5.17)
        # (hidden (N, H), LM head, targets (N,)) -> CE (N,) without the logits (backbone.kernels: liger)
        self.fused_row_ce = None
        # A diffusion LM attends both ways: transformers builds bidirectional masks from this flag.
        self.model.config.is_causal = False

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: BackboneConfig, tokenizer=None, seed: int = 0, empty: bool = False,
                    diffusion: Optional[DiffusionConfig] = None) -> "DiffusionModel":
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
            enable_activation_checkpointing(model)
        mask_id, added = provide_mask_token(model, tokenizer, mask_token_config(cfg, tokenizer), seed)
        if cfg.lora is not None:  # adapters (and the mask row) train; merged into the weights on export
            from lightning_dlm.model.lora import apply_lora

            model = apply_lora(model, cfg.lora, mask_id)
        return cls(model, mask_id, added, diffusion=diffusion, tokenizer=tokenizer,
                   attn_implementation=cfg.attn_implementation)

    @classmethod
    def from_pretrained(cls, path: str, map_location: Union[str, torch.device] = "cpu",
                        trust_checkpoint: bool = False, trust_remote_code: bool = False) -> "DiffusionModel":
        """The model of a folder written by ``dlm export`` / :meth:`save_pretrained`, a ``.ckpt``
        or sharded checkpoint folder written by ``dlm fit``, a released diffusion LM's folder
        (DiffuGPT, DiffuLLaMA, Dream, LLaDA, Fast-dLLM v2, Tiny-A2D: :mod:`lightning_dlm.io.releases`),
        or a hub name of an exported model or a release; in eval mode on ``map_location``. Loading
        runs no code from the files unless ``trust_checkpoint`` (see
        :func:`lightning_dlm.io.safe_read.load_checkpoint_file`); ``trust_remote_code=True`` is refused."""
        model = load_model(str(path), cls, trust_checkpoint=trust_checkpoint,
                           trust_remote_code=trust_remote_code).to(map_location).eval()
        model.check_row_logits()
        return model

    def save_pretrained(self, folder: str, dtype: str = "keep", progress=None) -> str:
        """Write the export format: the transformers model (safetensors, ``is_causal: false``), the
        tokenizer naming the mask token, and ``diffusion_config.json``; atomically (a staging folder
        renamed at the end). ``dtype``: ``keep``, ``float32`` or ``bfloat16``."""
        return save_model(self, folder, dtype=dtype, progress=progress)

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
        """The attention kernel the model runs. transformers 5.x has no public accessor for it (only
        the private ``config._attn_implementation``), so it is the one given when this model was
        built (:meth:`from_config` passes ``backbone.attn_implementation``, which transformers honours
        or refuses), else transformers' default for a model built without a request (an exported
        folder or a checkpoint read by :meth:`from_pretrained`)."""
        return self._attn

    # --- forward ----------------------------------------------------------------------------
    def mask_dtype(self) -> torch.dtype:
        """The dtype an additive attention mask takes: the autocast dtype of the model's device
        while autocast is on there, else the model's own dtype."""
        device = self.model.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return self.model.dtype

    @property
    def objective(self) -> str:
        """What the weights were trained with: ``diffusion``, or ``ar`` for a run of the plain causal
        objective (``model.objective: ar``, the AR baseline), which is a causal LM, not a sampler's model."""
        return str(self.info.get("objective", "diffusion"))

    @property
    def schedule(self) -> NoiseSchedule:
        return get_schedule(self.diffusion.schedule, **(self.diffusion.schedule_kwargs or {}))

    @property
    def shift(self) -> bool:
        return bool(self.diffusion.shift)

    @property
    def row_logits_exact(self) -> bool:
        """Whether ``lm_head(hidden_states(...))`` equals the model's logits (no soft-capping or
        scaling after the head), so the head may run on selected rows only (checked numerically)."""
        if self._row_logits_exact is None:
            self.check_row_logits()
        return bool(self._row_logits_exact)

    @row_logits_exact.setter
    def row_logits_exact(self, value: bool) -> None:
        """Set False to force the full-logits path (e.g. to compare the two)."""
        self._row_logits_exact = bool(value)

    @torch.no_grad()
    def check_row_logits(self) -> bool:
        """Decide, by running both on a short input, whether the LM head alone gives the model's
        logits (a family that soft-caps or scales them after the head does not). Weights still on
        the meta device (a sharded load in progress) defer the check to the first use."""
        if self._row_logits_exact is not None:
            return self._row_logits_exact
        head = self.model.get_output_embeddings()
        if head is None:
            self._row_logits_exact = False
            return False
        if any(p.is_meta for p in self.model.parameters()):
            return False
        device = next(self.model.parameters()).device
        ids = torch.arange(8, device=device).remainder(self.vocab_size).view(1, 8).repeat(2, 1)
        ids[1] = ids[1].flip(0)
        was_training = self.model.training
        self.model.eval()
        try:
            full = self.model(input_ids=ids, use_cache=False).logits.float()
            rows = head(self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state).float()
        finally:
            self.model.train(was_training)
        scale = full.abs().max().clamp_min(1.0)
        self._row_logits_exact = bool(((full - rows).abs().max() / scale) < 1e-4)
        return self._row_logits_exact

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
        return additive_attention_mask(allowed, attention_mask, dtype=self.mask_dtype(), document_ids=document_ids)

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

    def scored_logits(self, input_ids: torch.Tensor, rows: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      allowed: Allowed = None, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (N, V) of the positions ``rows`` (B, L) bool marks, in row-major order: the LM
        head runs on those rows only when it alone gives the model's logits."""
        if self.row_logits_exact:
            hidden = self.hidden_states(input_ids, attention_mask=attention_mask, allowed=allowed,
                                        document_ids=document_ids)
            return self.lm_head(hidden[rows])
        return self(input_ids, attention_mask=attention_mask, allowed=allowed, document_ids=document_ids)[rows]

    def scored_ce(self, input_ids: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None, allowed: Allowed = None,
                  document_ids: Optional[torch.Tensor] = None, drop_id: Optional[int] = None) -> torch.Tensor:
        """Cross-entropy (N,), fp32, of the rows ``rows`` (B, L) marks against ``targets`` (N,): from
        :meth:`scored_logits`, or, with a fused row cross-entropy (``backbone.kernels: liger``), from
        the rows' hidden states and the LM head without materialising their logits. ``drop_id``: the
        softmax leaves that token out (SUBS, :func:`~lightning_dlm.core.loss.drop_logit`; on the fused
        path from the target's and that token's logits, :func:`~lightning_dlm.core.loss.drop_logit_ce`)."""
        if self.fused_row_ce is not None and self.row_logits_exact:
            hidden = self.hidden_states(input_ids, attention_mask=attention_mask, allowed=allowed,
                                        document_ids=document_ids)[rows]
            head = self.model.get_output_embeddings()
            ce = self.fused_row_ce(hidden, head, targets)
            if drop_id is None:
                return ce
            z = _row_logits_at(head, hidden, torch.stack([targets, torch.full_like(targets, drop_id)], 1))
            return drop_logit_ce(ce, z[:, 0], z[:, 1])
        logits = self.scored_logits(input_ids, rows, attention_mask=attention_mask, allowed=allowed,
                                    document_ids=document_ids)
        if drop_id is not None:
            logits = drop_logit(logits, drop_id)
        return F.cross_entropy(logits.float(), targets, reduction="none")

    # --- the block diffusion layout (diffusion.attention: block) -------------------------------
    def two_copy_mask(self, length: int, block_size: int, attention_mask: Optional[torch.Tensor],
                      document_ids: Optional[torch.Tensor], batch: int, device):
        """The attention argument of the 2L layout (noised copy + clean copy, the three-part
        pattern of :mod:`lightning_dlm.core.blocks`) for this model's attention kernel."""
        if self.attn_implementation == FLEX:
            check_flex_call(self.model, device)
            if document_ids is not None:
                raise DLMError("block diffusion with flex_attention does not separate packed documents yet: "
                               "use attn_implementation: sdpa, or data without document_ids")
            mod = block_mask_mod(length, block_size, attention_mask.to(device) if attention_mask is not None else None)
            rows = batch if attention_mask is not None else 1
            return block_mask_from_mod(mod, rows, 2 * length, 2 * length, device)
        if self.attn_implementation == "flash_attention_2":
            raise DLMError("flash_attention_2 takes no attention mask, so it cannot run block diffusion: "
                           "use attn_implementation: sdpa or flex_attention")
        allowed = block_attention_allowed(length, block_size, device)
        pad = torch.cat([attention_mask, attention_mask], 1) if attention_mask is not None else None
        docs = torch.cat([document_ids, document_ids], 1) if document_ids is not None else None
        return additive_attention_mask(allowed, pad, dtype=self.mask_dtype(), document_ids=docs)

    def block_scored_logits(self, x0: torch.Tensor, xt: torch.Tensor, sources: torch.Tensor, block_size: int,
                            attention_mask: Optional[torch.Tensor] = None,
                            document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (N, V) of the rows ``sources`` (B, 2L) marks, from one pass over [x_t, x_0].

        At block size 1 with only clean rows scored (the shift), the noised copy is never read: the
        pass runs the clean copy alone under the causal pattern (the causal LM's own computation).
        """
        batch, length = x0.shape
        if block_size == 1 and not bool(sources[:, :length].any()):
            return self.scored_logits(x0, sources[:, length:], attention_mask=attention_mask,
                                      allowed=causal_allowed(length, x0.device), document_ids=document_ids)
        limit = self.max_positions
        if limit is not None and length > limit:
            raise DLMError(f"sequence length {length} is above the model's position limit {limit}: lower seq_len")
        positions = (position_ids_from_padding(attention_mask) if attention_mask is not None
                     else torch.arange(length, device=x0.device).expand(batch, length))
        ids = torch.cat([xt, x0], dim=1)
        mask = self.two_copy_mask(length, block_size, attention_mask, document_ids, batch, x0.device)
        inputs = dict(input_ids=ids, attention_mask=mask, position_ids=block_positions(positions), use_cache=False)
        if self.row_logits_exact:
            hidden = self.model.get_decoder()(**inputs).last_hidden_state
            return self.lm_head(hidden[sources])
        return self.model(**inputs).logits[sources]

    def cached_forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       position_ids: torch.Tensor, keep: torch.Tensor, past=None,
                       use_cache: bool = False) -> Tuple[torch.Tensor, Any]:
        """The sampler's forward: explicit ``position_ids``, optional past keys/values (transformers
        cache), the logits at positions ``keep`` only (the LM head runs there alone where the model
        takes ``logits_to_keep``). Returns ``(logits (B, len(keep), V), cache)``: ``past`` is a
        transformers ``Cache`` (or None), passed under the keyword the model takes (``cache=`` in
        transformers 5.24, ``past_key_values=`` in 5.17: :mod:`lightning_dlm.model.hf_compat`)."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        kwargs[self._cache_keyword] = past
        out = self.model(**kwargs, use_cache=use_cache)
        logits = out.logits if self._takes_logits_to_keep else out.logits.index_select(1, keep)
        return logits, returned_cache(out)

