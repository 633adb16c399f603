"""One rank of tests/test_sharded_loading.py: load a pretrained folder into an FSDP model the
sharded way (meta build, FSDP materialisation, rank-0 broadcast), measure this process's peak
memory over it, then compare the loaded weights and logits with an ordinary unsharded load.

    python -m torch.distributed.run --nproc_per_node 2 tests/sharded_load_worker.py FOLDER OUT_DIR
"""

import gc
import json
import os
import resource
import sys
from functools import partial

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(folder: str, out_dir: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig, load_tokenizer
    from lightning_dlm.model.sharded_loading import broadcast_into_sharded, materialize_meta
    from tests.conftest import TINY_TOKENIZER

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = BackboneConfig(pretrained=folder, tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig(mode="add"))
    gc.collect()
    before = peak_rss_bytes()

    net = DiffusionModel.from_config(cfg, load_tokenizer(TINY_TOKENIZER), empty=True)
    meta_after_build = all(p.is_meta for p in net.parameters())
    cpu = torch.device("cpu")
    sharded = FSDP(net, device_id=cpu, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                   param_init_fn=partial(materialize_meta, device=cpu), use_orig_params=True)
    source = None
    if rank == 0:
        source = DiffusionModel.from_config(cfg, load_tokenizer(TINY_TOKENIZER)).model.state_dict()
    broadcast_into_sharded(sharded, source, prefix="model.")
    del source
    gc.collect()
    peak = peak_rss_bytes() - before
    shard_bytes = sum(p.numel() * p.element_size() for p in sharded.parameters())

    reference = DiffusionModel.from_config(cfg, load_tokenizer(TINY_TOKENIZER))
    full_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    expected = {name: p for name, p in reference.named_parameters()}
    mismatched = []
    with FSDP.summon_full_params(sharded, writeback=False):
        names = []
        for name, p in sharded.named_parameters():
            name = name.replace("_fsdp_wrapped_module.", "")
            names.append(name)
            if not torch.equal(p, expected[name]):
                mismatched.append(name)
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        logits_equal = torch.equal(sharded(x), reference(x))
    result = dict(rank=rank, peak_bytes=peak, shard_bytes=shard_bytes, full_bytes=full_bytes,
                  meta_after_build=meta_after_build, names_match=sorted(names) == sorted(expected),
                  mismatched=mismatched, logits_equal=logits_equal, mask_id=reference.mask_token_id,
                  mask_row_norm=float(expected["model.model.embed_tokens.weight"][reference.mask_token_id].norm()))
    result["lightning"] = lightning_check(folder, out_dir, reference)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


def lightning_check(folder: str, out_dir: str, reference) -> dict:
    """DiffusionLM under Lightning's FSDPStrategy (2 CPU ranks, decoder-layer units, activation
    checkpointing): configure_model builds the backbone empty, on_fit_start broadcasts rank 0's
    weights into the shards; at the first training batch the full weights equal the reference."""
    import lightning as L
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_dlm.data import CorpusSource, TextDataModule
    from lightning_dlm.model import BackboneConfig, MaskTokenConfig
    from lightning_dlm.training.module import DiffusionLM
    from tests.conftest import TINY_CORPUS, TINY_TOKENIZER
    from tests.ddp_worker import cpu_fsdp_strategy

    class Probe(L.Callback):
        def __init__(self):
            self.seen = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.seen:
                return
            expected = dict(reference.named_parameters())
            with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
                got = {n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
                       .removeprefix("net."): p.detach().clone() for n, p in trainer.strategy.model.named_parameters()}
            self.seen = {"equal": sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in got),
                         "built_empty": self.built_empty}

        def setup(self, trainer, pl_module, stage):
            self.built_empty = None

        def on_fit_start(self, trainer, pl_module):  # after configure_model and wrapping, before the load
            self.built_empty = bool(pl_module._pending_weights)

    module = DiffusionLM(backbone=BackboneConfig(pretrained=folder, tokenizer=TINY_TOKENIZER,
                                                 mask_token=MaskTokenConfig(mode="add")))
    data = TextDataModule(train=[CorpusSource(path=TINY_CORPUS, sample_by="paragraph")], tokenizer=TINY_TOKENIZER,
                          seq_len=32, batch_size=2)
    probe = Probe()
    strategy = cpu_fsdp_strategy(auto_wrap_policy={LlamaDecoderLayer}, activation_checkpointing_policy={LlamaDecoderLayer})
    trainer = L.Trainer(default_root_dir=out_dir, max_steps=1, accelerator="cpu", devices=2, strategy=strategy,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        enable_checkpointing=False, callbacks=[probe])
    trainer.fit(module, data)
    return probe.seen


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
