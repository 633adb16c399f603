"""``DiffusionLM``: the LightningModule, a thin composition of the backbone (``DiffusionModel``)
and the run's objective (``lightning_dlm.objectives``, built once from the registry).

The objective draws its noise (t, masks, annealing masks) from generators (or, for the annealing
mask, a hash) seeded by (seed, batch counter, rank), and the module reseeds dropout the same way,
so a resumed run draws exactly what the uninterrupted run drew. Batches may carry ``document_ids`` (B, L) to keep attention within the
documents of packed rows.
Checkpoints are self-contained: they carry the model's transformers config and tokenizer, so
``DiffusionLM.load_from_checkpoint(path)`` works without the original weights or paths.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from typing import Any, Dict, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torchmetrics.aggregation import MeanMetric, SumMetric

from lightning_dlm.core.blocks import check_block_seq_len
from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.core.records import coerce_config
from lightning_dlm.core.seeding import derive_seed
from lightning_dlm.io.format import CHECKPOINT_FORMAT, CHECKPOINT_KEY
from lightning_dlm.io.safe_read import read_checkpoint
from lightning_dlm.io.tokenizer_files import tokenizer_from_files, tokenizer_to_files
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig, load_tokenizer
from lightning_dlm.model.compiled import compile_decoder_layers
from lightning_dlm.model.fused_kernels import KERNELS, LIGER, apply_liger
from lightning_dlm.model.layers import decoder_layer_classes
from lightning_dlm.model.loading import max_positions, resolve_hf_config
from lightning_dlm.model.pretrained import check_backbone
from lightning_dlm.model.sharded_loading import loads_pretrained_weights, materialize_empty, read_pretrained_shards
from lightning_dlm.objectives import build_objective
from lightning_dlm.training.distributed import clip_grad_norm_sharded
from lightning_dlm.training.fsdp2 import FSDP2Strategy, free_gathered_root, shard_diffusion_model
from lightning_dlm.training.optim import OptimConfig, build_optimizer, lr_multiplier
from lightning_dlm.training.resume import apply_optim_changes, compare_hparams

#: logged with every validation: the training tokens seen when it ran (its x-axis in dlm compare;
#: the train logs, thinned by log_every_n_steps, need not hold the validation's step)
VAL_TOKENS = "val/tokens_seen"


class DiffusionLM(L.LightningModule):
    """A pretrained causal LM trained as a masked diffusion LM.

    Args:
        backbone: which model to adapt (see :class:`BackboneConfig`).
        diffusion: the objective: schedule, shift, normalisation, annealing.
        optim: AdamW and learning-rate schedule.
        seed: seeds every noise draw together with the batch counter and the rank.
        val_t_levels: validation estimates E_t on this many fixed, equally spaced levels of t.
        objective: a ``model.objective`` of the registry of lightning_dlm.objectives: ``diffusion``
            (the method; the block objective under ``diffusion.attention: block``) or ``ar``, the
            causal LM baseline through the same model, data and trainer (its val/nelbo is the
            exact NLL per token). ``self.objective_impl`` is the built :class:`Objective`.
    """

    def __init__(
        self,
        backbone: BackboneConfig,
        diffusion: DiffusionConfig = DiffusionConfig(),
        optim: OptimConfig = OptimConfig(),
        seed: int = 0,
        val_t_levels: int = 8,
        objective: str = "diffusion",
    ):
        super().__init__()
        self.backbone_cfg = coerce_config(BackboneConfig, backbone)
        self.diffusion_cfg = coerce_config(DiffusionConfig, diffusion).check()
        check_backbone(self.backbone_cfg, self.diffusion_cfg)  # no trust_remote_code; a release's own conventions
        self.optim_cfg = coerce_config(OptimConfig, optim).check()
        if val_t_levels < 1:
            raise DLMError(f"val_t_levels must be >= 1, got {val_t_levels}")
        self.objective_impl = build_objective(objective, self.diffusion_cfg, seed, val_t_levels)  # or a DLMError
        self.save_hyperparameters(
            {
                "backbone": asdict(self.backbone_cfg),
                "diffusion": asdict(self.diffusion_cfg),
                "optim": asdict(self.optim_cfg),
                "seed": seed,
                "val_t_levels": val_t_levels,
                "objective": objective,
            }
        )
        self.objective = objective
        self.seed = seed
        self.val_t_levels = val_t_levels
        self.schedule = self.objective_impl.schedule
        self.net: Optional[DiffusionModel] = None
        self._row_check_pending = False  # FSDP2: check_row_logits once the shards hold the weights
        self._first_nonfinite: Optional[torch.Tensor] = None  # first step with a nan/inf loss (device)
        self.tokenizer = None
        self.tokens_seen = 0
        # NELBO per token (weighted by targets), its square and the number of batches: the mean and
        # its standard error over the evaluation batches (val/nelbo_se)
        self.val_nelbo, self.val_nelbo_sq, self.val_batches = MeanMetric(), MeanMetric(), SumMetric()
        self.test_nelbo, self.test_nelbo_sq, self.test_batches = MeanMetric(), MeanMetric(), SumMetric()

    # --- model construction -------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the backbone once (also called by Lightning for sharded strategies).

        Under FSDP2 (:class:`~lightning_dlm.training.fsdp2.FSDP2Strategy`) the backbone is sharded
        here, one ``fully_shard`` unit per decoder layer, and a pretrained one is built on the meta
        device with each rank reading only its own shards of the safetensors
        (:meth:`_configure_fsdp2`). Under Lightning's FSDP1 ``FSDPStrategy`` with no
        ``auto_wrap_policy``, the units are the model's own decoder layers (``_no_split_modules``).
        """
        if self.net is not None:
            return
        cfg = self.backbone_cfg
        if cfg.tokenizer_source is not None:
            self.tokenizer = load_tokenizer(cfg.tokenizer_source, cfg.trust_remote_code)
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy):
            self._configure_fsdp2(strategy)
            return
        self.net = DiffusionModel.from_config(cfg, self.tokenizer, seed=self.seed, diffusion=self.diffusion_cfg)
        if isinstance(strategy, FSDPStrategy) and "auto_wrap_policy" not in strategy.kwargs:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            strategy.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(set(decoder_layer_classes(self.net)))
        self.net.check_row_logits()  # now, not inside the first (FLOP-counted) training step
        self._apply_runtime_options(self.net)
        # from_pretrained returns eval mode, and Lightning keeps the mode it finds: dropout-bearing
        # models would silently train without dropout.
        self.net.train()

    def _configure_fsdp2(self, strategy: FSDP2Strategy) -> None:
        """The backbone sharded by ``fully_shard``: built empty when it loads pretrained weights, each
        rank then reading its own shards (not when resuming: the DCP checkpoint brings them)."""
        cfg = self.backbone_cfg
        if cfg.lora is not None:
            raise DLMError("model.backbone.lora is not supported under trainer.strategy fsdp2 yet: train LoRA "
                           "adapters with --trainer.strategy ddp (or auto), which holds the frozen base once per GPU")
        pretrained = loads_pretrained_weights(cfg)
        net = DiffusionModel.from_config(cfg, self.tokenizer, seed=self.seed, empty=pretrained, diffusion=self.diffusion_cfg)
        self._apply_runtime_options(net)  # before fully_shard, as torchtitan compiles each block first
        shard_diffusion_model(net, strategy.shard_mesh, strategy.wrap_classes, strategy.mixed_precision_policy(),
                              strategy.reshard_after_forward, strategy.activation_checkpointing)
        if pretrained:
            materialize_empty(net, strategy.root_device)
            if not self.trainer.ckpt_path:
                read_pretrained_shards(net.model, cfg, net.mask_token_id, net.mask_token_added, seed=self.seed)
        self.net = net
        self._row_check_pending = True  # a collective forward: once the weights are in (on_fit_start & co.)
        self.net.train()

    def _run_device(self, net: DiffusionModel) -> torch.device:
        """The device this module trains on: the strategy's, else where its parameters are."""
        if self._trainer is not None:
            return self.trainer.strategy.root_device
        return next(net.parameters()).device

    def _apply_runtime_options(self, net: DiffusionModel) -> None:
        """``backbone.kernels: liger`` (Liger's fused modules and row cross-entropy) and
        ``backbone.compile`` (each decoder layer compiled), each refused in one line where it
        cannot run; applied after the row-logits check, which runs the plain eager model."""
        cfg = self.backbone_cfg
        if cfg.kernels not in KERNELS:
            raise DLMError(f"unknown backbone.kernels '{cfg.kernels}': choose one of {', '.join(KERNELS)}")
        if cfg.kernels == LIGER:
            apply_liger(net, self._run_device(net))
        if cfg.compile:
            compile_decoder_layers(net.model, self._run_device(net))

    def _check_rows_once(self) -> None:
        if self._row_check_pending:
            self._row_check_pending = False
            self.net.check_row_logits()
            free_gathered_root(self.net)  # the check ran no backward, which would have freed them

    def on_fit_start(self) -> None:
        self._check_rows_once()

    def on_validation_start(self) -> None:
        self._check_rows_once()

    def on_test_start(self) -> None:
        self._check_rows_once()

    def on_predict_start(self) -> None:
        self._check_rows_once()

    @property
    def mask_token_id(self) -> int:
        return self._require_net().mask_token_id

    def _require_net(self) -> DiffusionModel:
        if self.net is None:
            self.configure_model()
        return self.net

    def forward(self, input_ids, attention_mask=None, allowed=None, document_ids=None) -> torch.Tensor:
        return self._require_net()(input_ids, attention_mask=attention_mask, allowed=allowed, document_ids=document_ids)

    def setup(self, stage: str) -> None:
        # The backbone is NOT built here: Lightning calls configure_model after setup, inside the
        # strategy's init/sharding context (FSDP wraps and shards it layer by layer there). The
        # position limit comes from the model's config alone.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        seq_len = getattr(datamodule, "seq_len", None)
        limit = self.net.max_positions if self.net is not None else max_positions(resolve_hf_config(self.backbone_cfg))
        if seq_len is not None and limit is not None and seq_len > limit:
            raise DLMError(
                f"data.seq_len {seq_len} is above the model's position limit {limit}: set data.seq_len <= {limit}"
            )
        if seq_len is not None and self.diffusion_cfg.is_block:
            check_block_seq_len(self.diffusion_cfg, int(seq_len))

    # --- the objective --------------------------------------------------------------------------
    def _batch_counter(self, batch: Dict[str, Any], batch_idx: int) -> int:
        if "index" in batch:
            return int(batch["index"])
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return self.global_step * accumulate + batch_idx % accumulate

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Dropout draws from torch's global generator: reseed it per batch so resume is exact.
        torch.manual_seed(derive_seed(self.seed, self._batch_counter(batch, batch_idx), self.global_rank, 1))

    def training_step(self, batch, batch_idx):
        x0 = batch["input_ids"]
        out = self.objective_impl.train_terms(self._require_net(), batch, step=self.global_step,
                                              counter=self._batch_counter(batch, batch_idx), rank=self.global_rank)
        terms = out.terms
        loss = terms.normalized(self.diffusion_cfg.normalization)  # the AR terms score every target: both agree
        self._note_nonfinite(loss)
        world = self.trainer.world_size if self._trainer is not None else 1
        self.tokens_seen += x0.numel() * world
        if not self._logging_step():
            return loss  # no host synchronisation and no cross-rank reduction between logging steps
        self.check_finite_loss()
        log = dict(on_step=True, on_epoch=False, batch_size=x0.shape[0])
        # Every rank draws its own batch and noise: log the mean over ranks (the loss DDP optimises).
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, **log)
        self.log("train/nelbo", terms.normalized("elbo"), sync_dist=True, **log)
        self.log("train/anneal_ratio", out.anneal_ratio, **log)
        self.log("train/masked_fraction", out.masked.sum() / out.maskable.sum().clamp_min(1), sync_dist=True, **log)
        for name, value in out.logs.items():  # the objective's own scalars (e.g. train/block_size)
            self.log(name, value, **log)
        self.log("train/tokens_seen", float(self.tokens_seen), **log)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], **log)
        return loss

    def _logging_step(self) -> bool:
        """Whether the Trainer writes logs after this optimiser step (``log_every_n_steps``)."""
        if self._trainer is None:
            return True
        every = max(1, int(self.trainer.log_every_n_steps or 1))
        last = self.trainer.max_steps > 0 and self.global_step + 1 >= self.trainer.max_steps
        return (self.global_step + 1) % every == 0 or last

    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        """Remember, on the device (no host sync), the first step whose loss was nan or inf."""
        step = torch.full((), self.global_step, dtype=torch.long, device=loss.device)
        if self._first_nonfinite is None:
            self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self._first_nonfinite < 0)
        self._first_nonfinite = torch.where(bad, step, self._first_nonfinite)

    def check_finite_loss(self) -> None:
        """Stop with one line if a loss since the start was nan or inf (checked on logging steps and
        before every checkpoint, so no checkpoint is written after it)."""
        if self._first_nonfinite is None:
            return
        step = int(self._first_nonfinite.item())
        if step >= 0:
            raise DLMError(
                f"the training loss is nan or inf at step {step}: lower model.optim.lr, set trainer.gradient_clip_val, "
                f"or use bf16-mixed rather than 16-mixed; no checkpoint was written after it"
            )

    def nelbo_per_token(self, x0: torch.Tensor, attention_mask=None, batch_key: int = 0, levels: Optional[int] = None,
                        document_ids=None, row_keys: Optional[torch.Tensor] = None,
                        protected: Optional[torch.Tensor] = None):
        """(NLL bound per target token, number of targets) of a batch under this run's objective:
        :meth:`Objective.eval_nll` (a fixed grid of t and fixed masks, exact for ``ar``)."""
        return self.objective_impl.eval_nll(self._require_net(), x0, attention_mask, batch_key=batch_key, levels=levels,
                                            document_ids=document_ids, row_keys=row_keys, protected=protected)

    def _eval_step(self, batch, batch_idx, prefix: str) -> None:
        nelbo, num_targets = self.nelbo_per_token(
            batch["input_ids"], batch.get("attention_mask"), batch_idx, document_ids=batch.get("document_ids"),
            row_keys=batch.get("block_index"), protected=batch.get("prompt_mask"),
        )
        getattr(self, f"{prefix}_nelbo").update(nelbo, weight=num_targets)
        getattr(self, f"{prefix}_nelbo_sq").update(nelbo.double() ** 2, weight=num_targets)
        getattr(self, f"{prefix}_batches").update(1.0)

    def _eval_epoch_end(self, prefix: str) -> None:
        metric = getattr(self, f"{prefix}_nelbo")
        if metric.update_count == 0:
            return
        value = metric.compute()
        square, batches = getattr(self, f"{prefix}_nelbo_sq").compute(), getattr(self, f"{prefix}_batches").compute()
        spread = (square - value.double() ** 2).clamp_min(0)
        self.log(f"{prefix}/nelbo", value, prog_bar=True, sync_dist=False)
        if batches >= 2:  # a standard error needs two batches at least
            self.log(f"{prefix}/nelbo_se", (spread / (batches - 1)).sqrt().float(), sync_dist=False)
        self.log(f"{prefix}/ppl_bound", torch.exp(value), sync_dist=False)
        if prefix == "val":  # the x-axis of this validation, at its own step (dlm compare reads it)
            self.log(VAL_TOKENS, float(self.tokens_seen), sync_dist=False)
        for name in ("nelbo", "nelbo_sq", "batches"):
            getattr(self, f"{prefix}_{name}").reset()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    # --- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        optimizer, scheduler = build_optimizer(self._require_net(), self.optim_cfg, max_steps if max_steps > 0 else None)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's FSDP plugin cannot clip by norm; the sharded model clips by the global norm.
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            if clip_grad_norm_sharded(self.trainer.strategy, gradient_clip_val) is not None:
                return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # --- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.check_finite_loss()  # never write weights trained through a nan/inf loss
        net = self._require_net()
        hf_config = net.config.to_dict()
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "mask_token_id": net.mask_token_id,
            "mask_token_added": net.mask_token_added,
            "tokens_seen": self.tokens_seen,
            "tokenizer_files": tokenizer_to_files(self.tokenizer),
        }
        # Rebuilding from the checkpoint needs neither the original weights nor their path: the
        # backbone is described by its full transformers config and an explicit mask id. The
        # hyper-parameters stay as the user wrote them (LightningCLI reads them on --ckpt_path).
        restore = replace(
            self.backbone_cfg,
            pretrained=None,
            config=hf_config,
            from_scratch=False,
            tokenizer=None,
            mask_token=replace(self.backbone_cfg.mask_token, mode="reuse", id=net.mask_token_id),
            compile=False, kernels="plain",  # how this run trained, not what a reader of the weights needs
        )
        checkpoint[CHECKPOINT_KEY]["backbone"] = asdict(restore)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, weights_only=None,
                             **kwargs):
        """Load a checkpoint anywhere: the backbone is rebuilt from the config stored in it. The file is
        read with ``torch.load(weights_only=True)`` (no code in it runs); ``weights_only`` set to False, for
        a file whose author you trust, unpickles it in full (see lightning_dlm.io.safe_read.load_checkpoint_file)."""
        trust = weights_only is False
        path = os.fspath(checkpoint_path)
        if os.path.isdir(path):
            raise DLMError(f"'{path}' is a folder: load a sharded or exported checkpoint with lightning_dlm.io.safe_read.load_diffusion_lm")
        checkpoint = read_checkpoint(path, trust=trust)  # one-line errors for missing, damaged, foreign or unsafe files
        kwargs.setdefault("backbone", checkpoint[CHECKPOINT_KEY]["backbone"])
        del checkpoint
        return super().load_from_checkpoint(path, map_location, hparams_file, strict, weights_only=not trust, **kwargs)

    @classmethod
    def from_model(cls, model: DiffusionModel) -> "DiffusionLM":
        """A DiffusionLM around a loaded :class:`DiffusionModel` (its weights, config and
        tokenizer), e.g. to validate or keep training it."""
        backbone = BackboneConfig(config=model.config.to_dict(), dtype=str(model.model.dtype).replace("torch.", ""),
                                  attn_implementation=model.attn_implementation,
                                  mask_token=MaskTokenConfig(mode="reuse", id=model.mask_token_id))
        module = cls(backbone=backbone, diffusion=model.diffusion, seed=int(model.info.get("seed", 0)),
                     val_t_levels=int(model.info.get("val_t_levels", 8)), objective=model.objective)
        module.net, module.tokenizer = model, model.tokenizer
        module.tokens_seen = int(model.info.get("tokens_seen", 0))
        return module

    def _follow_new_optim_options(self, checkpoint: Dict[str, Any]) -> None:
        """A resume with new optimiser options (allowed and printed by the CLI): the restored
        optimiser and scheduler state take the new peak lr, betas, decay and schedule."""
        saved = (checkpoint.get("hyper_parameters") or {}).get("optim")
        if saved is None or compare_hparams(saved, asdict(self.optim_cfg)) == ([], []):
            return
        cfg = self.optim_cfg
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        total = cfg.total_steps or (max_steps if max_steps and max_steps > 0 else 1)
        step = int(checkpoint.get("global_step", 0))
        apply_optim_changes(checkpoint, cfg.lr, cfg.lr * lr_multiplier(step, cfg, total), cfg.betas,
                            cfg.weight_decay, cfg.adam_eps)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise DLMError("this checkpoint was not written by lightning_dlm (no diffusion metadata): pass a DiffusionLM checkpoint")
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        self._follow_new_optim_options(checkpoint)
        if self.tokenizer is None and meta.get("tokenizer_files"):
            self.tokenizer = tokenizer_from_files(meta["tokenizer_files"])
        net = self._require_net()
        net.mask_token_added = bool(meta["mask_token_added"])
        if net.mask_token_id != meta["mask_token_id"]:
            raise DLMError(
                f"mask token id mismatch: the checkpoint used {meta['mask_token_id']}, this model "
                f"{net.mask_token_id}: use the same backbone.mask_token settings as the checkpoint"
            )


def load_diffusion_lm(path: str, map_location: str = "cpu", trust_checkpoint: bool = False) -> DiffusionLM:
    """A :class:`DiffusionLM` in eval mode around :meth:`DiffusionModel.from_pretrained` of ``path``
    (a ``.ckpt`` or sharded checkpoint folder written by ``dlm fit``, or a folder written by ``dlm
    export``): for what the LightningModule adds (``nelbo_per_token``, ``dlm validate``-style
    evaluation). To sample or evaluate, load the :class:`DiffusionModel` itself."""
    model = DiffusionModel.from_pretrained(path, map_location=map_location, trust_checkpoint=trust_checkpoint)
    return DiffusionLM.from_model(model).eval()
