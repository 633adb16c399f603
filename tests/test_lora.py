"""LoRA through peft: only the adapters and the mask row train; merged exports give the adapter model's logits."""

import lightning as L
import pytest
import torch

from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig, load_tokenizer
from lightning_dlm.model.config import LoraOptions
from lightning_dlm.model.lora import has_lora, trainable_names
from lightning_dlm.training.module import DiffusionLM
from lightning_dlm.training.optim import OptimConfig, build_optimizer
from tests.conftest import TINY_TOKENIZER

MODEL = dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
             tie_word_embeddings=True)
LORA = LoraOptions(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def backbone(lora=LORA):
    return BackboneConfig(config=dict(MODEL), tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig(mode="add"), lora=lora)


def build(lora=LORA):
    torch.manual_seed(0)
    cfg = backbone(lora)
    return DiffusionModel.from_config(cfg, load_tokenizer(TINY_TOKENIZER), diffusion=DiffusionConfig())


def train_steps(model, steps=3):
    optimizer, _ = build_optimizer(model, OptimConfig(lr=5e-2, lr_schedule="constant"), None)
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 3:6] = model.mask_token_id  # the mask row gets gradient
    for _ in range(steps):
        loss = model(ids).float().logsumexp(-1).mean() - model(ids)[..., 7].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_only_adapters_and_mask_row_train():
    model = build()
    assert has_lora(model.model)
    names = trainable_names(model)
    assert names and all("lora_" in n or "trainable_tokens_delta" in n for n in names)
    assert any("trainable_tokens_delta" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    embed_before = model.model.get_input_embeddings()(torch.arange(model.vocab_size)).detach().clone()
    train_steps(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen[name]), name
    embed_after = model.model.get_input_embeddings()(torch.arange(model.vocab_size)).detach()
    changed = (embed_after != embed_before).any(-1).nonzero().flatten().tolist()
    assert changed == [model.mask_token_id]


def test_merged_export_gives_the_adapter_logits(tmp_path):
    model = build()
    train_steps(model)
    model.eval()
    ids = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    ids[0, 4] = model.mask_token_id
    with torch.no_grad():
        adapter = model(ids)
    folder = model.save_pretrained(str(tmp_path / "export"))
    assert has_lora(model.model)  # the export merged a copy
    loaded = DiffusionModel.from_pretrained(folder)
    assert not any("lora" in n or "token_adapter" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        merged = loaded(ids)
    torch.testing.assert_close(merged, adapter, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged, build(lora=None)(ids), atol=1e-3)  # LoRA changed the model


def test_lora_checkpoint_loads_merged(tmp_path):
    torch.manual_seed(0)
    module = DiffusionLM(backbone=backbone(), optim=OptimConfig(lr=5e-2, lr_schedule="constant"))
    module.configure_model()
    train_steps(module.net, steps=2)
    trainer = L.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(str(tmp_path / "lora.ckpt"), weights_only=True)
    loaded = DiffusionModel.from_pretrained(str(tmp_path / "lora.ckpt"))
    ids = torch.randint(0, 500, (1, 9), generator=torch.Generator().manual_seed(2))
    module.net.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), module.net(ids), atol=1e-5, rtol=1e-5)


def test_unknown_target_modules_are_named():
    with pytest.raises(DLMError, match=r"\['qkv'\] are not modules of this model.*'q_proj'"):
        build(LoraOptions(target_modules=["qkv"]))
