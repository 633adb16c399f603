"""lightning_dlm.model.hf_compat: the one place that bridges transformers 5.24 (these machines) and
5.17 (the lent GPU machine). Each helper is checked against the installed transformers and
against an object shaped like 5.17's API; `make test-gpu-versions` runs the GPU paths' tests on
the real 5.17."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from lightning_dlm.model.hf_compat import cache_keyword, drop_last, enable_activation_checkpointing, returned_cache


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


class Old(torch.nn.Module):  # transformers 5.17: the cache is past_key_values, anything else is swallowed
    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        return {"past_key_values": past_key_values} if use_cache else {}


class NoCache(torch.nn.Module):
    def forward(self, input_ids, **kwargs):
        return {}


def test_the_cache_keyword_is_read_from_the_models_forward():
    model = tiny_llama()
    keyword = cache_keyword(model)  # cache (transformers 5.24) or past_key_values (5.17)
    with torch.no_grad():  # the cache given under that keyword is the one the model fills and returns
        cache = returned_cache(model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **{keyword: DynamicCache()}))
        again = returned_cache(model(input_ids=torch.tensor([[4]]), use_cache=True, **{keyword: cache}))
    assert cache.get_seq_length() == 4 and again.get_seq_length() == 4
    assert cache_keyword(Old()) == "past_key_values"
    with pytest.raises(TypeError, match="NoCache.forward takes no KV cache"):
        cache_keyword(NoCache())  # never guessed: a cache under a name the model swallows is silently unused


def test_the_returned_cache_is_found_under_either_name():
    model = tiny_llama()
    out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert returned_cache(out) is not None and returned_cache(out).get_seq_length() == 3
    sentinel = object()
    assert returned_cache(Old()(None, past_key_values=sentinel, use_cache=True)) is sentinel
    assert returned_cache(model(input_ids=torch.tensor([[1]]), use_cache=False)) is None


def test_a_static_cache_drops_its_last_columns_in_place():
    model = tiny_llama()
    cache = StaticCache(config=model.config, max_cache_len=8)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), use_cache=True, **{cache_keyword(model): cache})
    keys = cache.layers[0].keys
    assert cache.get_seq_length() == 5
    drop_last(cache, 2)
    assert cache.get_seq_length() == 3 and cache.layers[0].keys is keys  # the same tensor: graph replay stays valid

    class OldLayer:  # 5.17's static layer: a public counter, no crop
        def __init__(self):
            self.cumulative_length = torch.tensor(6)

    class OldStatic:
        def __init__(self):
            self.layers = [OldLayer(), OldLayer()]

        def crop(self, n):
            raise AttributeError("'StaticLayer' object has no attribute 'crop'")  # what 5.17 raised

    old = OldStatic()
    drop_last(old, 4)
    assert [int(layer.cumulative_length) for layer in old.layers] == [2, 2]
    with pytest.raises(ValueError):
        drop_last(old, -1)


def test_activation_checkpointing_takes_the_current_name_and_falls_back_to_the_old():
    model = tiny_llama()

    def on() -> bool:  # transformers 5.24's name, or 5.17's
        return getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing

    assert not on()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated alias called on 5.24
        enable_activation_checkpointing(model)
    assert on()

    calls = []

    class OldModel:  # 5.17: gradient_checkpointing_enable only
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(gradient_checkpointing_kwargs)

    enable_activation_checkpointing(OldModel())
    assert calls == [{"use_reentrant": False}]
