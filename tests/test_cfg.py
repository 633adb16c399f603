"""Classifier-free guidance: scale 0 is unguided decoding, the unconditional pass sees the prompt masked."""

import pytest
import torch

from lightning_dlm.core import get_schedule
from lightning_dlm.core.errors import DLMError
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig, load_tokenizer
from lightning_dlm.sampling import SamplerConfig, build_canvas, decode, generate
from lightning_dlm.sampling.guidance import guided, unconditional_ids
from tests.conftest import TINY_TOKENIZER

V, MASK = 11, 10


def stub(seen):
    """A denoiser whose logits depend on how many prompt tokens are visible (so guidance changes them)."""
    def fn(ids, attention_mask):
        seen.append(ids.clone())
        visible = (ids[:, :3] != MASK).sum(1).float()
        base = torch.arange(V, dtype=torch.float)[None, None, :] * 0.1
        logits = base * (1 + visible)[:, None, None] + torch.sin(ids.float())[..., None]
        return logits.expand(ids.shape[0], ids.shape[1], V).clone()
    return fn


def canvas():
    return build_canvas([[1, 2, 3], [4, 5, 6]], 5, MASK, 0, None, align_targets=True)


@pytest.mark.parametrize("strategy", ["random", "confidence", "threshold"])
def test_scale_zero_equals_unguided(strategy):
    options = {"threshold": 0.5} if strategy == "threshold" else {}
    kwargs = dict(schedule=get_schedule("linear"), seeds=[3, 4], mask_id=MASK)
    plain = decode(stub([]), canvas(), SamplerConfig(steps=5, strategy=strategy, strategy_options=options), **kwargs)
    zero = decode(stub([]), canvas(), SamplerConfig(steps=5, strategy=strategy, strategy_options=options, cfg_scale=0.0),
                  **kwargs)
    assert torch.equal(plain.ids, zero.ids) and plain.tokens == zero.tokens
    assert plain.stats.forward_passes == zero.stats.forward_passes
    seen = []
    strong = decode(stub(seen), canvas(), SamplerConfig(steps=5, strategy=strategy, strategy_options=options,
                                                        temperature=0, cfg_scale=3.0), **kwargs)
    assert len(seen) == 2 * strong.stats.forward_passes  # a conditional and an unconditional pass per step
    unconditional = seen[1::2]
    assert all((u[:, :3] == MASK).all() for u in unconditional)  # the prompt is masked there
    assert all(torch.equal(c[:, 3:], u[:, 3:]) for c, u in zip(seen[0::2], unconditional))  # nothing else changes


def test_guided_logits_formula_and_infill_suffix_masked():
    cond, uncond = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 3.0]])
    assert torch.equal(guided(cond, uncond, 0.5), torch.tensor([[2.5, 0.0]]))
    ids = torch.tensor([[0, 7, 8, MASK, MASK, 9, 0]])
    attention = torch.tensor([[0, 1, 1, 1, 1, 1, 0]])
    assert unconditional_ids(ids, attention, 3, 5, MASK).tolist() == [[0, MASK, MASK, MASK, MASK, MASK, 0]]


def test_negative_scale_is_refused():
    with pytest.raises(DLMError, match="cfg_scale must be >= 0"):
        SamplerConfig(cfg_scale=-0.5).check()
    with pytest.raises(DLMError, match="cfg_scale needs cache='none'"):
        SamplerConfig(cfg_scale=1.0, cache="prefix").check()


def test_generate_with_a_model():
    torch.manual_seed(0)
    cfg = BackboneConfig(config=dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=64), tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig())
    model = DiffusionModel.from_config(cfg, load_tokenizer(TINY_TOKENIZER)).eval()
    plain = generate(model, ["hello world"], length=6, steps=6, temperature=0)
    zero = generate(model, ["hello world"], length=6, steps=6, temperature=0, cfg_scale=0.0)
    strong = generate(model, ["hello world"], length=6, steps=6, temperature=0, cfg_scale=2.0)
    assert plain.token_ids == zero.token_ids
    assert len(strong.token_ids[0]) == 6
    with pytest.raises(DLMError, match="cfg_scale must be >= 0"):
        generate(model, ["x"], length=2, steps=2, cfg_scale=-1)


def test_dlm_sample_cfg_scale(tmp_path, capsys):
    from lightning_dlm.cli import main

    torch.manual_seed(0)
    cfg = BackboneConfig(config=dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=64), tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig())
    folder = DiffusionModel.from_config(cfg, load_tokenizer(TINY_TOKENIZER)).save_pretrained(str(tmp_path / "m"))
    main(["sample", "--ckpt", folder, "--prompt", "hello", "--length", "4", "--steps", "4", "--cfg_scale", "1.5"])
    assert "hello\u27e6" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--ckpt", folder, "--prompt", "hello", "--cfg_scale", "-1"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == "error: cfg_scale must be >= 0 (0 = no guidance), got -1.0"
