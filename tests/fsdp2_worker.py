"""One rank of the 2-process CPU (gloo) FSDP2 checks in tests/test_fsdp2.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp2_worker.py CHECKS OUT_DIR [FOLDER]

CHECKS is a comma-separated list of:

* ``equal``: a DiffusionModel sharded by lightning_dlm.training.fsdp2.shard_diffusion_model (one
  unit per decoder layer, activation checkpointing) trains 3 AdamW steps, clipped by the global
  norm, on each rank's half of a batch; an unsharded copy in the same process trains on the whole
  batch (the mean of both halves' losses). Losses, norms and weights are recorded for both.
* ``lightning``: DiffusionLM under FSDP2Strategy (accelerator cpu, 2 devices): 4 steps with DCP
  checkpoints every 2, then 2 steps resumed from the step-2 checkpoint.
* ``shrunk`` (1 process): the resume of that 2-rank checkpoint by 1 rank (to be refused).
* ``load``: the pretrained FOLDER loaded the FSDP2 way (meta build, fully_shard, each rank reading
  its own rows of the safetensors), with this process's peak memory over the load, then the
  weights compared with an ordinary unsharded load.
* ``pretrained``: DiffusionLM under FSDP2Strategy from FOLDER, its weights at the first batch.
"""

import copy
import gc
import json
import os
import resource
import sys

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("shard",))


def equal_check(out_dir: str, *_, steps: int = 3, max_norm: float = 0.05) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lightning_dlm.core.config import DiffusionConfig
    from lightning_dlm.core.seeding import make_generator
    from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig
    from lightning_dlm.objectives import build_objective
    from lightning_dlm.training.distributed import clip_grad_norm_sharded, global_grad_norm
    from lightning_dlm.training.fsdp2 import FSDP2Strategy, shard_diffusion_model
    from lightning_dlm.training.optim import OptimConfig, build_optimizer
    from tests.conftest import TINY_LLAMA

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    cfg = BackboneConfig(config=dict(TINY_LLAMA), mask_token=MaskTokenConfig(mode="reuse", id=3))
    net = DiffusionModel.from_config(cfg)
    reference = copy.deepcopy(net)
    classes = shard_diffusion_model(net, _mesh(), mp_policy=MixedPrecisionPolicy(), activation_checkpointing=True)
    objective = build_objective("diffusion", DiffusionConfig(), 0, 8)
    optim = OptimConfig(lr=1e-2, warmup_steps=0)
    opt, _ = build_optimizer(net, optim, 10)
    ref_opt, _ = build_optimizer(reference, optim, 10)
    strategy = FSDP2Strategy()
    strategy.model = net

    def loss_of(model, r, step):
        x0 = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(100 * step + r))
        t = torch.tensor([0.3, 0.8]) if r == 0 else torch.tensor([0.5, 0.6])
        terms, _, _ = objective.diffusion_terms(model, x0, None, t, None, make_generator(7 + step, r))
        return terms.normalized("elbo")

    sharded_losses, reference_losses, norms, reference_norms = [], [], [], []
    for step in range(steps):
        loss = loss_of(net, rank, step)
        loss.backward()
        norms.append(clip_grad_norm_sharded(strategy, max_norm).item())
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        sharded_losses.append(mean.item() / world)
        ref_loss = sum(loss_of(reference, r, step) for r in range(world)) / world
        ref_loss.backward()
        reference_norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm).item())
        ref_opt.step()
        ref_opt.zero_grad()
        reference_losses.append(ref_loss.item())
    worst = 0.0
    expected = dict(reference.named_parameters())
    local_elems = 0
    for name, param in net.named_parameters():
        local_elems += param.to_local().numel()
        full = param.full_tensor()
        worst = max(worst, ((full - expected[name]).abs().max() / expected[name].abs().max().clamp_min(1e-12)).item())
    grads_after = global_grad_norm(net.parameters())
    return {"sharded": sharded_losses, "reference": reference_losses, "norms": norms, "reference_norms": reference_norms,
            "worst_rel_diff": worst, "classes": [c.__name__ for c in classes],
            "local_elems": local_elems, "full_elems": sum(p.numel() for p in reference.parameters()),
            "zeroed": grads_after is None}


def lightning_check(out_dir: str, *_, max_norm: float = 0.05) -> dict:
    import lightning as L

    from lightning_dlm.core.errors import DLMError
    from lightning_dlm.training.callbacks import TrainingThroughput
    from lightning_dlm.training.distributed import global_grad_norm
    from lightning_dlm.training.fsdp2 import FSDP2Strategy
    from tests.ddp_worker import tiny_module_and_data

    class Record(L.Callback):
        def __init__(self):
            self.losses, self.before, self.after, self.local = {}, [], [], None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # before clipping
            self.before.append(global_grad_norm(pl_module.parameters()).item())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses[trainer.global_step - 1] = outputs["loss"].item()
            self.after.append(global_grad_norm(pl_module.parameters()).item())
            self.local = sum(p.to_local().numel() for p in pl_module.net.parameters())

    def fit(steps, callbacks, ckpt_path=None, devices=2):
        module, data = tiny_module_and_data(batch_size=3)
        strategy = FSDP2Strategy(param_dtype=None, reduce_dtype=None, activation_checkpointing=True, global_batch_size=4)
        trainer = L.Trainer(default_root_dir=out_dir, max_steps=steps, accelerator="cpu", devices=devices, strategy=strategy,
                            gradient_clip_val=max_norm, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return module, data.batch_size

    if dist.is_initialized() and dist.get_world_size() == 1:  # a 2-rank checkpoint resumed by 1 rank
        try:
            fit(4, [], ckpt_path=os.path.join(out_dir, "ck", "step2.ckpt"), devices=1)
        except DLMError as err:
            return {"refused": str(err)}
        return {"refused": None}

    straight, resumed = Record(), Record()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=os.path.join(out_dir, "ck"), every_n_train_steps=2,
                                                      save_top_k=-1, filename="step{step}", auto_insert_metric_name=False)
    counted = TrainingThroughput(window=2)  # counts FLOPs in the first step, under FSDP2
    module, per_rank = fit(4, [straight, checkpoints, counted])
    final = {name: p.full_tensor() for name, p in module.named_parameters()}  # the step-4 weights, whole
    if dist.get_rank() == 0:
        torch.save(final, os.path.join(out_dir, "final.pt"))
    fit(4, [resumed], ckpt_path=os.path.join(out_dir, "ck", "step2.ckpt"))
    return {"straight": straight.losses, "resumed": resumed.losses, "before": straight.before, "after": straight.after,
            "per_rank_batch": per_rank, "local_params": straight.local,
            "flops": {"forward": counted.step_flops.forward, "backward": counted.step_flops.backward,
                      "recompute": counted.step_flops.recompute}}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def load_check(out_dir: str, folder: str) -> dict:
    from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig, load_tokenizer
    from lightning_dlm.model.sharded_loading import materialize_empty, read_pretrained_shards
    from lightning_dlm.training.fsdp2 import shard_diffusion_model
    from tests.conftest import TINY_TOKENIZER

    cfg = BackboneConfig(pretrained=folder, tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig(mode="add", init_noise_std=0.01))
    mesh = _mesh()
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    DiffusionModel.from_config(cfg, load_tokenizer(TINY_TOKENIZER), empty=True)  # imports, no weights: not measured
    gc.collect()
    before = peak_rss_bytes()
    net = DiffusionModel.from_config(cfg, tokenizer, empty=True)
    meta_after_build = all(p.is_meta for p in net.parameters())
    shard_diffusion_model(net, mesh)
    materialize_empty(net, torch.device("cpu"))
    read_pretrained_shards(net.model, cfg, net.mask_token_id, net.mask_token_added, seed=0)
    gc.collect()
    peak = peak_rss_bytes() - before
    shard_bytes = sum(p.to_local().numel() * p.element_size() for p in net.parameters())

    reference = DiffusionModel.from_config(cfg, load_tokenizer(TINY_TOKENIZER))
    full_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    expected = dict(reference.named_parameters())
    mismatched, worst_mask_row = [], 0.0
    names = []
    for name, param in net.named_parameters():
        names.append(name)
        full = param.full_tensor()
        if "embed_tokens" in name or "lm_head" in name:  # the added mask row: a mean, summed in another order
            row = reference.mask_token_id
            worst_mask_row = max(worst_mask_row, (full[row] - expected[name][row]).abs().max().item())
            keep = torch.ones(full.shape[0], dtype=torch.bool)
            keep[row] = False
            if not torch.equal(full[keep], expected[name][keep]):
                mismatched.append(name)
        elif not torch.equal(full, expected[name]):
            mismatched.append(name)
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits_diff = (net(x) - reference(x)).abs().max().item()
    return dict(peak_bytes=peak, shard_bytes=shard_bytes, full_bytes=full_bytes, meta_after_build=meta_after_build,
                names_match=sorted(names) == sorted(expected), mismatched=mismatched, worst_mask_row=worst_mask_row,
                mask_row_norm=float(expected["model.model.embed_tokens.weight"][reference.mask_token_id].norm()),
                logits_diff=logits_diff, buffers_equal=all(
                    torch.equal(b, dict(reference.named_buffers())[n]) for n, b in net.named_buffers()))


def pretrained_check(out_dir: str, folder: str) -> dict:
    """DiffusionLM under FSDP2Strategy (2 CPU ranks) from the pretrained FOLDER: configure_model
    builds it empty and each rank reads its shards; at the first training batch the whole weights
    equal an ordinary unsharded load."""
    import lightning as L

    from lightning_dlm.data import CorpusSource, TextDataModule
    from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig, load_tokenizer
    from lightning_dlm.training.fsdp2 import FSDP2Strategy
    from lightning_dlm.training.module import DiffusionLM
    from tests.conftest import TINY_CORPUS, TINY_TOKENIZER

    cfg = BackboneConfig(pretrained=folder, tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig(mode="add"))
    reference = dict(DiffusionModel.from_config(cfg, load_tokenizer(TINY_TOKENIZER)).named_parameters())
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if seen:
                return
            got = {name.removeprefix("net."): p.full_tensor() for name, p in pl_module.named_parameters()}
            seen["equal"] = sorted(got) == sorted(reference) and all(torch.equal(got[k], reference[k]) for k in got)
            seen["exact_rows"] = pl_module.net.row_logits_exact

    module = DiffusionLM(backbone=cfg)
    data = TextDataModule(train=[CorpusSource(path=TINY_CORPUS, sample_by="paragraph")], tokenizer=TINY_TOKENIZER,
                          seq_len=32, batch_size=2)
    trainer = L.Trainer(default_root_dir=out_dir, max_steps=1, accelerator="cpu", devices=2,
                        strategy=FSDP2Strategy(param_dtype=None), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False, callbacks=[Probe()])
    trainer.fit(module, data)
    return seen


CHECKS = {"equal": equal_check, "lightning": lightning_check, "shrunk": lightning_check, "load": load_check,
          "pretrained": pretrained_check}


def main(checks: str, out_dir: str, *args: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # Lightning finds it initialised and uses it
    for check in checks.split(","):
        result = CHECKS[check](out_dir, *args)
        with open(os.path.join(out_dir, f"{check}{dist.get_rank()}.json"), "w") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
