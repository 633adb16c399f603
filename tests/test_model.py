"""Model adapter: parity with the plain causal LM, attention modes, mask token, loading errors."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_dlm.core import annealing_allowed, causal_allowed
from lightning_dlm.core.errors import DLMError
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig


def _pair(config, impl="sdpa", mask_token=None):
    """The adapter and the plain HF causal LM with identical weights."""
    bc = BackboneConfig(config=dict(config), attn_implementation=impl,
                        mask_token=mask_token or MaskTokenConfig(mode="reuse", id=5))
    torch.manual_seed(0)
    net = DiffusionModel.from_config(bc, None).eval()
    cfg = dict(config)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), attn_implementation=impl).eval()
    return net, ref


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_ratio_zero_equals_plain_causal_lm_exactly(family_config, impl):
    net, ref = _pair(family_config, impl)
    x = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = net(x, allowed=annealing_allowed(20, 0.0, "random"))
        plain = ref(x).logits
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bidirectional_at_ratio_one_causal_at_ratio_zero(family_config, impl):
    net, _ = _pair(family_config, impl)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 97
    with torch.no_grad():
        bi, bi2 = net(x), net(x2)  # allowed=None: bidirectional (what ratio 1 gives)
        ca, ca2 = net(x, allowed=causal_allowed(16)), net(x2, allowed=causal_allowed(16))
    assert not torch.allclose(bi[:, 0], bi2[:, 0])  # the first position sees the last token
    assert torch.equal(ca[:, :-1], ca2[:, :-1])  # causal: nothing before the change moves


def test_full_dense_mask_equals_bidirectional_path(family_config):
    net, _ = _pair(family_config, "eager")
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = net(x, allowed=torch.ones(12, 12, dtype=torch.bool))
        fast = net(x)
    torch.testing.assert_close(dense, fast, rtol=1e-5, atol=1e-5)


def test_left_padding_gives_the_same_logits_as_unpadded(family_config):
    net, _ = _pair(family_config, "sdpa")
    x = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    attn = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = net(x)
        in_batch = net(padded, attention_mask=attn)[:, 3:]
        alone_anneal = net(x, allowed=causal_allowed(10))
        batch_anneal = net(padded, attention_mask=attn, allowed=causal_allowed(13))[:, 3:]
    torch.testing.assert_close(in_batch, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch_anneal, alone_anneal, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_annealing_mask_under_bf16_autocast(impl):
    from tests.conftest import TINY_LLAMA

    net, _ = _pair(TINY_LLAMA, impl)
    x = torch.randint(0, 97, (2, 12))
    allowed = annealing_allowed(12, 0.5, "random", torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x, allowed=allowed)
    assert torch.isfinite(logits).all()


class _Tok:
    """Minimal tokenizer stand-in with the methods the mask-token code uses."""

    def __init__(self, n):
        self.vocab = {f"t{i}": i for i in range(n)}
        self.mask_token = None

    def get_vocab(self):
        return dict(self.vocab)

    def add_special_tokens(self, d):
        tok = d["mask_token"]
        self.vocab[tok] = len(self.vocab)
        self.mask_token = tok

    def convert_tokens_to_ids(self, tok):
        return self.vocab[tok]

    def __len__(self):
        return len(self.vocab)


@pytest.mark.parametrize("tied", [True, False])
def test_added_mask_token_initialised_at_mean(tied):
    from tests.conftest import TINY_LLAMA

    cfg = dict(TINY_LLAMA, tie_word_embeddings=tied)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    emb_mean = plain.get_input_embeddings().weight.mean(0)
    head_mean = plain.get_output_embeddings().weight.mean(0)
    torch.manual_seed(0)
    tok = _Tok(97)
    net = DiffusionModel.from_config(BackboneConfig(config=cfg, mask_token=MaskTokenConfig(mode="add")), tok)
    assert net.mask_token_id == 97 and net.mask_token_added and net.vocab_size == 98
    assert tok.mask_token == "<|mask|>"
    torch.testing.assert_close(net.model.get_input_embeddings().weight[97], emb_mean)
    torch.testing.assert_close(net.model.get_output_embeddings().weight[97], emb_mean if tied else head_mean)
    # the old rows are untouched
    torch.testing.assert_close(net.model.get_input_embeddings().weight[:97], plain.get_input_embeddings().weight)


def test_added_mask_token_with_noise_differs_from_mean():
    from tests.conftest import TINY_LLAMA

    mt = MaskTokenConfig(mode="add", init_noise_std=0.02)
    net = DiffusionModel.from_config(BackboneConfig(config=dict(TINY_LLAMA), mask_token=mt), _Tok(97))
    row = net.model.get_input_embeddings().weight
    assert not torch.allclose(row[97], row[:97].mean(0))


def test_reuse_mask_token_by_id_and_errors():
    from tests.conftest import TINY_GPT2

    net = DiffusionModel.from_config(BackboneConfig(config=dict(TINY_GPT2), mask_token=MaskTokenConfig(mode="reuse", id=10)))
    assert net.mask_token_id == 10 and not net.mask_token_added and net.vocab_size == 97
    with pytest.raises(DLMError, match="mask token id 97 is outside the vocabulary"):
        DiffusionModel.from_config(BackboneConfig(config=dict(TINY_GPT2), mask_token=MaskTokenConfig(mode="reuse", id=97)))
    tok = _Tok(97)
    with pytest.raises(DLMError, match="already in the vocabulary"):
        DiffusionModel.from_config(BackboneConfig(config=dict(TINY_GPT2), mask_token=MaskTokenConfig(mode="add", token="t3")), tok)


def test_loading_errors_are_one_line(tmp_path):
    with pytest.raises(DLMError, match="does not exist") as err:
        DiffusionModel.from_config(BackboneConfig(pretrained=str(tmp_path / "missing")))
    assert "\n" not in str(err.value)
    with pytest.raises(DLMError, match="model_type"):
        DiffusionModel.from_config(BackboneConfig(config={"hidden_size": 8}))
    with pytest.raises(DLMError, match="flash"):
        DiffusionModel.from_config(BackboneConfig(config={"model_type": "llama"}, attn_implementation="flash_attention_2"))


def test_position_limit_is_enforced():
    from tests.conftest import TINY_LLAMA

    net, _ = _pair(TINY_LLAMA)
    with pytest.raises(DLMError, match="above the model's position limit 64"):
        net(torch.zeros(1, 65, dtype=torch.long))


def test_pretrained_folder_round_trip(tmp_path):
    from tests.conftest import TINY_LLAMA

    _, ref = _pair(TINY_LLAMA)
    ref.save_pretrained(tmp_path / "m")
    cfg = BackboneConfig(pretrained=str(tmp_path / "m"), mask_token=MaskTokenConfig(mode="reuse", id=3))
    net = DiffusionModel.from_config(cfg).eval()
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(net(x, allowed=causal_allowed(9)), ref(x).logits)
    assert net.config.is_causal is False
