"""FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``: the multi-GPU path.

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` (which calls the LightningModule's
``configure_model`` and saves torch.distributed.checkpoint (DCP) folders, one file per rank) with
the options of fully sharded data parallelism, and :func:`shard_diffusion_model` is what
``DiffusionLM.configure_model`` does with them:

* each decoder layer is one ``fully_shard`` unit (its parameters gathered just before it runs and
  freed after), then the root (embeddings, final norm, LM head) is one more, kept gathered from the
  forward to the backward (torchtitan's ``apply_fsdp`` does the same: docs/fsdp.md there). The
  layer class comes from ``wrap_classes`` or, unset, from the model's own ``_no_split_modules``
  (:func:`lightning_dlm.model.layers.decoder_layer_classes`);
* mixed precision by ``MixedPrecisionPolicy``: parameters all-gathered and used in ``param_dtype``
  (``auto``: bfloat16 under ``trainer.precision: bf16-mixed``, else their own float32), gradients
  reduce-scattered in ``reduce_dtype`` (default None: the parameter dtype; float32 as an option, at
  twice the gradient traffic), float32 master weights and AdamW state;
* activation checkpointing of the decoder layers through transformers' public API
  (:func:`~lightning_dlm.model.hf_compat.enable_activation_checkpointing`: non-reentrant
  ``torch.utils.checkpoint``, which FSDP2 composes with: a recomputed layer gathers its parameters
  again);
* a pretrained model is built on the meta device and each rank reads only its own shards from the
  safetensors (:mod:`lightning_dlm.model.sharded_loading`);
* clipping by the global norm: the gradients are DTensors and ``torch.nn.utils.get_total_norm``
  over them gives the norm over every shard (:func:`lightning_dlm.training.distributed.clip_grad_norm_sharded`).

``replicas`` > 1 is hybrid sharding (HSDP): a 2-D mesh, sharded within groups of
``world / replicas`` ranks (a node) and replicated across them. ``global_batch_size``, when set,
fixes the batch over all ranks and accumulation steps, and ``data.batch_size`` per rank follows
from the world size (a world size that does not divide it is one line).

Registered as ``--trainer.strategy fsdp2``. CPU processes (gloo) need ``--trainer.accelerator cpu``
explicitly (the tests' path); on a machine without CUDA anything else is refused in one line.
"""

from __future__ import annotations

from datetime import timedelta
from typing import List, Optional

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

from lightning_dlm.core.errors import DLMError
from lightning_dlm.model.hf_compat import enable_activation_checkpointing
from lightning_dlm.model.layers import decoder_layer_classes, decoder_layers

STRATEGY_NAME = "fsdp2"
WRAP_OPTION = "trainer.strategy.init_args.wrap_classes"
#: DiffusionModel's methods that run the backbone besides ``forward`` (the objectives call them):
#: FSDP2 gathers the root unit's parameters around each of them.
FORWARD_METHODS = ("hidden_states", "lm_head", "scored_logits", "block_scored_logits", "cached_forward", "scored_ce",
                   "check_row_logits")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"
#: param_dtype auto: the compute dtype of each trainer.precision (others: the parameters' own)
PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                    "16-true": torch.float16}


def _dtype(name: Optional[str], option: str) -> Optional[torch.dtype]:
    if name is None:
        return None
    key = str(name).replace("torch.", "")
    if key not in DTYPES:
        raise DLMError(f"trainer.strategy.init_args.{option} '{name}' is not a dtype: use one of "
                       f"{', '.join(DTYPES)}, auto or null")
    return DTYPES[key]


def per_rank_batch(global_batch_size: int, world_size: int, accumulate: int = 1) -> int:
    """The batch per rank and step of ``global_batch_size`` over ``world_size`` ranks and
    ``accumulate`` accumulation steps, or a one-line error when it does not divide."""
    ways = world_size * max(1, int(accumulate))
    per, rest = divmod(int(global_batch_size), ways)
    if rest or per < 1:
        raise DLMError(
            f"trainer.strategy.init_args.global_batch_size {global_batch_size} does not divide over {world_size} "
            f"rank(s) x {accumulate} accumulation step(s): choose a multiple of {ways}, or change --trainer.devices / "
            f"--trainer.num_nodes / accumulate_grad_batches")
    return per


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism with ``fully_shard`` (FSDP2), sharded (DCP) checkpoints.

    Args:
        wrap_classes: module classes to shard one instance at a time (names such as
            ``LlamaDecoderLayer``); default: the model's ``_no_split_modules``.
        activation_checkpointing: recompute each decoder layer's activations in the backward.
        param_dtype: the dtype parameters are gathered and used in; ``auto``: bfloat16 under
            ``trainer.precision`` bf16-mixed / bf16-true, float16 under 16-mixed, else their own.
        reduce_dtype: the dtype gradients are reduced in (null: ``param_dtype``).
        reshard_after_forward: free a layer's gathered parameters after its forward (ZeRO-3); false
            keeps them to the backward (ZeRO-2-like: more memory, one all-gather less per layer).
        replicas: hybrid sharding: shard within ``world / replicas`` ranks, replicate across.
        global_batch_size: the batch over all ranks and accumulation steps (sets data.batch_size).
        save_distributed_checkpoint: one DCP folder, a file per rank (false: one full file, gathered).
    """

    def __init__(self, wrap_classes: Optional[List[str]] = None, activation_checkpointing: bool = False,
                 param_dtype: Optional[str] = "auto", reduce_dtype: Optional[str] = None,
                 reshard_after_forward: bool = True, replicas: int = 1, global_batch_size: Optional[int] = None,
                 save_distributed_checkpoint: bool = True, process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = default_pg_timeout) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.wrap_classes = list(wrap_classes or [])
        self.activation_checkpointing = bool(activation_checkpointing)
        self.param_dtype = AUTO if param_dtype == AUTO else _dtype(param_dtype, "param_dtype")
        self.reduce_dtype = _dtype(reduce_dtype, "reduce_dtype")
        self.reshard_after_forward = bool(reshard_after_forward)
        if int(replicas) < 1:
            raise DLMError(f"trainer.strategy.init_args.replicas must be >= 1, got {replicas}")
        self.replicas = int(replicas)
        self.global_batch_size = global_batch_size
        self.shard_mesh = None

    @property
    def distributed_sampler_kwargs(self) -> dict:
        # every rank is a data-parallel rank (Lightning's own mesh is data x tensor parallel)
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def setup_environment(self) -> None:
        super().setup_environment()
        from torch.distributed.device_mesh import init_device_mesh

        world = self.world_size
        if world % self.replicas:
            raise DLMError(f"trainer.strategy.init_args.replicas {self.replicas} does not divide the world size "
                           f"{world}: use the number of nodes, or 1")
        shape, names = ((world,), ("shard",)) if self.replicas == 1 else ((self.replicas, world // self.replicas),
                                                                          ("replicate", "shard"))
        self.shard_mesh = init_device_mesh(self.root_device.type, shape, mesh_dim_names=names)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self.global_batch_size is not None and trainer is not None:
            per_rank = per_rank_batch(self.global_batch_size, world, trainer.accumulate_grad_batches)
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None and hasattr(datamodule, "batch_size"):
                datamodule.batch_size = per_rank

    def compute_dtype(self) -> Optional[torch.dtype]:
        """The dtype parameters are gathered in (None: their own)."""
        if self.param_dtype != AUTO:
            return self.param_dtype
        precision = str(getattr(self.precision_plugin, "precision", "32-true"))
        return PRECISION_DTYPES.get(precision)

    def mixed_precision_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.compute_dtype(), reduce_dtype=self.reduce_dtype)


StrategyRegistry.register(STRATEGY_NAME, FSDP2Strategy, description="FSDP2 (fully_shard per decoder layer), "
                          "DCP checkpoints", override=True)


def shard_diffusion_model(net: nn.Module, mesh, wrap_classes=None, mp_policy=None, reshard_after_forward: bool = True,
                          activation_checkpointing: bool = False) -> tuple:
    """``fully_shard`` each decoder layer of ``net`` (a DiffusionModel), then ``net`` itself as the
    root unit; returns the layer classes used. ``activation_checkpointing`` turns on transformers'
    checkpointing of the decoder layers first."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    classes = decoder_layer_classes(net, wrap_classes, option=WRAP_OPTION)
    if activation_checkpointing:
        enable_activation_checkpointing(net.model)
    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    layers = decoder_layers(net, classes)
    if not layers:
        raise DLMError(f"{type(net.model).__name__} has no module of class {', '.join(c.__name__ for c in classes)} to "
                       f"shard: set {WRAP_OPTION} to the class of its decoder layers")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # the root is used again at once by the backward: not resharded after the forward
    fully_shard(net, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    for method in FORWARD_METHODS:
        if hasattr(net, method):
            register_fsdp_forward_method(net, method)
    return classes


def free_gathered_root(net: nn.Module) -> None:
    """Reshard ``net``'s root unit after a forward without a backward (the root is kept gathered from
    its forward to its backward, and an evaluation-only forward has none)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(net, FSDPModule):
        net.reshard()
