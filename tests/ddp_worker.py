"""One rank of the 2-process CPU (gloo) checks in tests/test_distributed.py.

Launched by the test with ``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py SPEC``
(one launch serves every check, to pay the start-up once). ``SPEC`` is a JSON file:
``{"runs": [[dlm args...], ...], "out": DIR}``. Every rank runs each ``dlm`` command in order
(real ``dlm fit`` runs under Lightning's DDP, which finds torchrun's environment), then the FSDP
checks (torch FSDP clipping against an unsharded copy; DiffusionLM under Lightning's
FSDPStrategy with sharded checkpoints); it writes ``DIR/worker<rank>.json`` with the exit code of
every command and the numbers of the FSDP checks.
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def run_commands(runs):
    from lightning_dlm.cli import main

    codes = []
    for args in runs:
        try:
            main(list(args))
            codes.append(0)
        except SystemExit as exit_info:  # a DLMError: main printed "error: ..." and exited 2
            codes.append(exit_info.code)
    return codes


def fsdp_clipping_check(rank: int, world: int, max_norm: float = 0.05) -> dict:
    """Clip a FULL_SHARD FSDP model (CPU, gloo) with lightning_dlm's hook and compare with an
    unsharded copy that computes the same mean loss over both ranks' batches."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_dlm.core.seeding import make_generator
    from lightning_dlm.model import BackboneConfig, MaskTokenConfig
    from lightning_dlm.training.distributed import clip_grad_norm_sharded
    from lightning_dlm.training.module import DiffusionLM
    from tests.conftest import TINY_LLAMA

    class DiffusionLoss(torch.nn.Module):
        """The root FSDP unit: its forward is the diffusion loss of one rank's batch."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, r):
            x0 = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(100 + r))
            terms, _, _ = self.lm.objective_impl.diffusion_terms(self.lm.net, x0, None, torch.tensor([0.3, 0.8]), None,
                                                                 make_generator(7, r))
            return terms.normalized("elbo")

    torch.manual_seed(0)  # the same initial weights on every rank
    module = DiffusionLM(backbone=BackboneConfig(config=dict(TINY_LLAMA), mask_token=MaskTokenConfig(mode="reuse", id=3)))
    module.configure_model()
    reference = copy.deepcopy(DiffusionLoss(module))

    # sharded: this rank's batch; FSDP averages the gradients over the ranks
    sharded = FSDP(DiffusionLoss(module), device_id=torch.device("cpu"), use_orig_params=True,
                   auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), sharding_strategy=ShardingStrategy.FULL_SHARD)
    sharded(rank).backward()
    local = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in sharded.parameters() if p.grad is not None and p.grad.numel()])
    ).item()
    strategy = FSDPStrategy()
    strategy.model = sharded
    total = clip_grad_norm_sharded(strategy, max_norm).item()
    with FSDP.summon_full_params(sharded, with_grads=True):
        clipped = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                   for n, p in sharded.named_parameters() if p.grad is not None}

    # unsharded reference: the mean of both ranks' losses, clipped by torch's usual function
    (sum(reference(r) for r in range(world)) / world).backward()
    reference_total = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm).item()
    worst = 0.0
    for name, p in reference.named_parameters():
        worst = max(worst, (clipped[name] - p.grad).abs().max().item() / max(p.grad.abs().max().item(), 1e-12))
    return {"total": total, "reference_total": reference_total, "local": local, "worst_rel_diff": worst,
            "clipped_norm": torch.linalg.vector_norm(torch.stack([g.norm() for g in clipped.values()])).item()}


def tiny_module_and_data(batch_size: int):
    """The tiny LLaMA diffusion module and the fixture corpus the multi-process checks train."""
    from lightning_dlm.core.config import DiffusionConfig
    from lightning_dlm.data.datamodule import TextDataModule
    from lightning_dlm.data.sources import CorpusSource
    from lightning_dlm.model import BackboneConfig, MaskTokenConfig
    from lightning_dlm.training.module import DiffusionLM
    from tests.conftest import TINY_CORPUS, TINY_TOKENIZER

    model = dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                 eos_token_id=0)
    module = DiffusionLM(backbone=BackboneConfig(config=model, tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig()),
                         diffusion=DiffusionConfig(anneal_steps=3))
    data = TextDataModule(train=[CorpusSource(path=TINY_CORPUS, sample_by="paragraph")], tokenizer=TINY_TOKENIZER,
                          seq_len=32, batch_size=batch_size)
    return module, data


def cpu_fsdp_strategy(**kwargs):
    """Lightning's FSDPStrategy on CPU processes. Lightning refuses FSDP without CUDA (a subclass
    passes its check) and wraps with ``device_id=root_device.index`` (None on a CPU, which FSDP
    rejects); this wraps with ``device_id=cpu``, everything else is Lightning's."""
    from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model):
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
            )
            _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
            return model

    return CPUFSDPStrategy(**kwargs)


def lightning_fsdp_check(out_dir: str, max_norm: float = 0.05) -> dict:
    """DiffusionLM under Lightning's FSDPStrategy as the 7B config sets it up (FULL_SHARD, one unit
    per decoder layer, activation checkpointing, sharded checkpoints, norm clipping), on CPU
    processes: 4 steps straight, then 2 resumed from the sharded step-2 checkpoint."""
    import lightning as L
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer


    class Record(L.Callback):
        """Per-step loss and the global gradient norm before and after clipping (FSDP's own norm)."""

        def __init__(self):
            self.losses, self.before, self.after = {}, [], []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs before clipping
            self.before.append(trainer.strategy.model.clip_grad_norm_(float("inf")).item())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # grads kept until next step
            self.losses[trainer.global_step - 1] = outputs["loss"].item()
            self.after.append(trainer.strategy.model.clip_grad_norm_(float("inf")).item())

    def fit(steps, callbacks, ckpt_path=None):
        module, data = tiny_module_and_data(batch_size=4)
        strategy = cpu_fsdp_strategy(auto_wrap_policy={LlamaDecoderLayer}, activation_checkpointing_policy={LlamaDecoderLayer},
                                   state_dict_type="sharded")
        trainer = L.Trainer(default_root_dir=out_dir, max_steps=steps, accelerator="cpu", devices=2, strategy=strategy,
                            gradient_clip_val=max_norm, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(module, data, ckpt_path=ckpt_path)

    from lightning_dlm.training.callbacks import TrainingThroughput

    straight, resumed = Record(), Record()
    counted = TrainingThroughput(window=2)  # counts FLOPs in the first step of both runs, under FSDP
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=os.path.join(out_dir, "ck"), every_n_train_steps=2,
                                                      save_top_k=-1, filename="step{step}", auto_insert_metric_name=False)
    fit(4, [straight, checkpoints, counted])
    fit(4, [resumed, TrainingThroughput(window=2)], ckpt_path=os.path.join(out_dir, "ck", "step2.ckpt"))
    flops = counted.step_flops
    return {"straight": straight.losses, "resumed": resumed.losses, "before": straight.before, "after": straight.after,
            "flops": {"forward": flops.forward, "backward": flops.backward, "recompute": flops.recompute}}


def main(spec_path: str) -> None:
    with open(spec_path) as fh:
        spec = json.load(fh)
    torch.set_num_threads(1)
    codes = run_commands(spec["runs"])
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"codes": codes, "fsdp": fsdp_clipping_check(rank, world),
              "lightning_fsdp": lightning_fsdp_check(os.path.join(spec["out"], "fsdp"))}
    with open(os.path.join(spec["out"], f"worker{rank}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1])
