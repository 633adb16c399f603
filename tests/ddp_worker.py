"""One rank of the 2-process CPU (gloo) checks in tests/test_distributed.py.

Launched by the test with ``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py SPEC``
(one launch serves every check, to pay the start-up once). ``SPEC`` is a JSON file:
``{"runs": [[dlm args...], ...], "out": DIR}``. Every rank runs each ``dlm`` command in order
(real ``dlm fit`` runs under Lightning's DDP, which finds torchrun's environment), then the FSDP
gradient-clipping check; it writes ``DIR/worker<rank>.json`` with the exit code of every command
and the numbers of the FSDP check.
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

    from lightning_dlm.distributed import clip_grad_norm_sharded
    from lightning_dlm.model import BackboneConfig, MaskTokenConfig
    from lightning_dlm.module import DiffusionLM
    from lightning_dlm.seeding import make_generator
    from tests.conftest import TINY_LLAMA

    class DiffusionLoss(torch.nn.Module):
        """The root FSDP unit: its forward is the diffusion loss of one rank's batch."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, r):
            x0 = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(100 + r))
            terms, _, _ = self.lm.diffusion_terms(x0, None, torch.tensor([0.3, 0.8]), None, make_generator(7, r))
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


def main(spec_path: str) -> None:
    with open(spec_path) as fh:
        spec = json.load(fh)
    torch.set_num_threads(1)
    codes = run_commands(spec["runs"])
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"codes": codes, "fsdp": fsdp_clipping_check(rank, world)}
    with open(os.path.join(spec["out"], f"worker{rank}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1])
