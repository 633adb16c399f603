"""DiffusionLM + TextDataModule through a real Trainer: exact resume, validation, checkpoints, errors."""

import os
import shutil

import lightning as L
import pytest
import torch

from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.data import CorpusSource, TextDataModule
from lightning_dlm.model import BackboneConfig, MaskTokenConfig
from lightning_dlm.sampling import generate
from lightning_dlm.training.module import CHECKPOINT_KEY, DiffusionLM, load_diffusion_lm
from lightning_dlm.training.optim import OptimConfig
from tests.conftest import TINY_CORPUS, TINY_TOKENIZER

MODEL = dict(
    model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.1,
    bos_token_id=0, eos_token_id=0,
)


def make_module(tokenizer=TINY_TOKENIZER, anneal_steps=5, **kw):
    return DiffusionLM(
        backbone=BackboneConfig(config=dict(MODEL), tokenizer=tokenizer, mask_token=MaskTokenConfig(mode="add")),
        diffusion=DiffusionConfig(anneal_steps=anneal_steps, t_sampling="antithetic"),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, lr_schedule="cosine"),
        val_t_levels=3,
        **kw,
    )


def make_data(tokenizer=TINY_TOKENIZER, seq_len=32):
    src = CorpusSource(path=TINY_CORPUS, sample_by="paragraph")
    return TextDataModule(train=[src], val=[src], tokenizer=tokenizer, seq_len=seq_len, batch_size=4, val_max_blocks=8)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = outputs["loss"].item()


class StopAfter(L.Callback):
    """Interrupt a run after ``steps`` optimiser steps (as a crash or a time limit would)."""

    def __init__(self, steps):
        self.steps = steps

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def make_trainer(root, max_steps, callbacks=(), **kw):
    return L.Trainer(
        default_root_dir=str(root), max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks),
        deterministic=True, **kw,
    )


def test_resume_is_exact(tmp_path):
    L.seed_everything(0)
    full = LossRecorder()
    make_trainer(tmp_path / "full", 8, [full]).fit(make_module(), make_data())

    L.seed_everything(0)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    first = LossRecorder()
    make_trainer(tmp_path / "a", 8, [first, ckpt, StopAfter(3)]).fit(make_module(), make_data())
    assert sorted(first.losses) == [0, 1, 2]
    resumed = LossRecorder()
    path = os.path.join(tmp_path / "ck", os.listdir(tmp_path / "ck")[0])
    L.seed_everything(123)  # a different global seed must not matter: all noise is derived
    make_trainer(tmp_path / "b", 8, [resumed]).fit(make_module(), make_data(), ckpt_path=path)

    assert sorted(full.losses) == list(range(8))
    assert sorted(resumed.losses) == [3, 4, 5, 6, 7]  # annealing (5 steps) spans the resume point
    for step in range(3):
        assert first.losses[step] == full.losses[step]
    for step in range(3, 8):
        assert resumed.losses[step] == full.losses[step], step  # equal to the last bit


def test_validation_is_deterministic_and_reports_bound(tmp_path):
    module, data = make_module(), make_data()
    trainer = L.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    a = trainer.validate(module, data, verbose=False)[0]
    b = trainer.validate(module, data, verbose=False)[0]
    assert a["val/nelbo"] == b["val/nelbo"]
    assert a["val/ppl_bound"] == pytest.approx(torch.exp(torch.tensor(a["val/nelbo"])).item(), rel=1e-6)
    # an untrained 512-token model: NELBO per token near the uniform cross-entropy ln(513) (times E[w] ~ 1)
    assert 3.0 < a["val/nelbo"] < 12.0


def test_checkpoint_is_self_contained_and_ready_to_sample(tmp_path):
    tok_copy = tmp_path / "tok"
    shutil.copytree(TINY_TOKENIZER, tok_copy)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2)
    module = make_module(tokenizer=str(tok_copy))
    make_trainer(tmp_path, 2, [ckpt]).fit(module, make_data(tokenizer=str(tok_copy)))
    shutil.rmtree(tok_copy)  # the checkpoint must not need the original tokenizer (or weights) path
    path = ckpt.best_model_path or os.path.join(tmp_path / "ck", os.listdir(tmp_path / "ck")[0])
    raw = torch.load(path, weights_only=False)
    assert raw[CHECKPOINT_KEY]["mask_token_added"] is True
    assert raw[CHECKPOINT_KEY]["mask_token_id"] == 512
    loaded = load_diffusion_lm(path)
    assert loaded.mask_token_id == 512 and loaded.net.mask_token_added
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    out = generate(loaded, ["Once upon a time"], length=8, steps=8, seed=0)
    assert len(out.token_ids[0]) == 8 and 512 not in out.token_ids[0]
    assert isinstance(out.texts[0], str)


class _NaNAtStep2(DiffusionLM):
    """Its objective's loss is nan at step 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        train_terms = self.objective_impl.train_terms

        def nan_at_step_2(net, batch, *, step, counter, rank):
            out = train_terms(net, batch, step=step, counter=counter, rank=rank)
            if step == 2:
                out.terms.weighted_sum = out.terms.weighted_sum * float("nan")
            return out

        self.objective_impl.train_terms = nan_at_step_2


def test_nan_loss_stops_with_a_clear_error_and_no_checkpoint(tmp_path):
    module = _NaNAtStep2(backbone=BackboneConfig(config=dict(MODEL), tokenizer=TINY_TOKENIZER))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(DLMError, match="the training loss is nan or inf at step 2: lower model.optim.lr"):
        make_trainer(tmp_path, 5, [ckpt]).fit(module, make_data())
    assert sorted(os.listdir(tmp_path / "ck")) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]


def test_seq_len_above_position_limit_is_refused(tmp_path):
    with pytest.raises(DLMError, match="data.seq_len 256 is above the model's position limit 128"):
        make_trainer(tmp_path, 1).fit(make_module(), make_data(seq_len=256))


def test_pretrained_backbone_trains_in_train_mode(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(MODEL)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(tmp_path / "m")
    module = DiffusionLM(backbone=BackboneConfig(pretrained=str(tmp_path / "m"), tokenizer=TINY_TOKENIZER))
    module.configure_model()
    assert all(m.training for m in module.net.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lm_head_on_scored_rows_matches_full_logits(family):
    from tests.conftest import FAMILIES

    def terms_and_grads(force_full):
        torch.manual_seed(0)
        module = DiffusionLM(backbone=BackboneConfig(config=dict(FAMILIES[family]), mask_token=MaskTokenConfig(mode="reuse", id=3)))
        module.configure_model()
        assert module.net.row_logits_exact  # checked numerically: the head alone gives the logits
        if force_full:
            module.net.row_logits_exact = False
        x0 = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
        allowed = torch.ones(16, 16, dtype=torch.bool).tril()
        terms, _, _ = module.objective_impl.diffusion_terms(module.net, x0, None, torch.tensor([0.3, 0.6, 0.9]), allowed,
                                                            torch.Generator().manual_seed(2))
        terms.normalized("elbo").backward()
        return terms, [p.grad.clone() for p in module.parameters()]

    rows, rows_grads = terms_and_grads(False)
    full, full_grads = terms_and_grads(True)
    torch.testing.assert_close(rows.weighted_sum, full.weighted_sum, rtol=1e-5, atol=1e-5)
    assert int(rows.num_scored) == int(full.num_scored)
    for a, b in zip(rows_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_generate_builds_a_fresh_module_lazily():
    module = make_module()
    assert module.net is None
    out = generate(module, ["Once"], length=4, steps=4)
    assert len(out.token_ids[0]) == 4


def test_setup_checks_positions_without_building_the_model():
    """Lightning calls configure_model after setup, inside the strategy's sharding context (FSDP):
    setup must not build the backbone itself, only check seq_len against the config."""
    module = make_module()
    module.setup("fit")
    assert module.net is None
    module.configure_model()
    assert module.net is not None


def test_validation_nelbo_does_not_depend_on_batching_or_world_size():
    """Evaluation noise is keyed by each block's global index and ranks take disjoint, unpadded
    shards, so the metric averaged over 2 'ranks' equals the 1-process value."""
    from torch.utils.data import DataLoader

    from lightning_dlm.data.stream import BlockDataset, ShardSampler

    module = make_module()
    module.configure_model()
    module.eval()
    blocks = torch.randint(1, 500, (5, 24), generator=torch.Generator().manual_seed(0))
    dataset = BlockDataset(blocks)

    def metric(loaders):
        total = weight = 0.0
        for loader in loaders:
            for batch in loader:
                nelbo, n = module.nelbo_per_token(batch["input_ids"], row_keys=batch["block_index"])
                total, weight = total + float(nelbo) * n, weight + n
        return total / weight

    single = metric([DataLoader(dataset, batch_size=2)])
    shards = [ShardSampler(dataset, 2, rank) for rank in (0, 1)]
    assert sorted(i for s in shards for i in s) == list(range(5))  # every block once, no padding
    two_ranks = metric([DataLoader(dataset, batch_size=3, sampler=s) for s in shards])
    assert two_ranks == pytest.approx(single, rel=1e-6)
    assert metric([DataLoader(dataset, batch_size=2)]) == single  # and it is reproducible


def test_the_row_logits_check_is_numeric():
    """A model that transforms its logits after the LM head (soft-capping, scaling) is caught by
    running both paths, not by a list of config keys."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_dlm.model import DiffusionModel
    from tests.conftest import TINY_LLAMA

    torch.manual_seed(0)
    config = dict(TINY_LLAMA)
    llama = DiffusionModel(AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)),
                           mask_token_id=3, mask_token_added=False)
    assert llama.check_row_logits() is True
    scaled = DiffusionModel(AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **config)),
                            mask_token_id=3, mask_token_added=False)
    scaled.model.register_forward_hook(lambda mod, args, out: out.__setitem__("logits", out["logits"] * 2) or out)
    assert scaled.check_row_logits() is False
    gemma = AutoConfig.for_model("gemma2", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5)
    capped = DiffusionModel(AutoModelForCausalLM.from_config(gemma), mask_token_id=3, mask_token_added=False)
    assert capped.check_row_logits() is False
    x0 = torch.randint(4, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    rows = torch.zeros(2, 10, dtype=torch.bool)
    rows[:, 3:6] = True
    with torch.no_grad():  # the full path serves a capped model: its logits are the model's own
        torch.testing.assert_close(capped.scored_logits(x0, rows), capped(x0)[rows])
