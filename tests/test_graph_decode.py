"""Graph-captured block decoding (issue 23 item 5): the block decoder's fixed-shape passes over a
static KV cache (lightning_dlm.sampling.static_blocks) give the eager decoder's tokens, token for
token; compiled on the CPU (inductor; CUDA graphs: tests/test_cuda_kernels.py); every dynamic
shape is refused in one line."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_dlm.core import get_schedule
from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.model import DiffusionModel
from lightning_dlm.model.compiled import cpu_compiler
from lightning_dlm.sampling.block_decode import block_decode
from lightning_dlm.sampling.engine import SamplerConfig

B = 4
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]  # equal lengths: the same blocks per row


def block_net(device="cpu", seed=0, shift=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa")
    net = DiffusionModel(LlamaForCausalLM(cfg).eval(), 96, False, attn_implementation="sdpa",
                         diffusion=DiffusionConfig(attention="block", block_size=B, shift=shift).check())
    return net.to(device)


def decode(net, prefixes=PROMPTS, length=12, strategy="confidence", temperature=0.0, steps=2, **kw):
    config = SamplerConfig(steps=steps, temperature=temperature, strategy=strategy,
                           stop_at_eos=kw.pop("stop_at_eos", False))
    return block_decode(net, prefixes, length, config, block_size=B, schedule=get_schedule("linear"),
                        seeds=list(range(1, len(prefixes) + 1)), shift=net.shift, **kw)


@pytest.mark.parametrize("strategy, temperature, prefixes, shift", [
    ("confidence", 0.0, PROMPTS, True),
    ("random", 0.9, PROMPTS, True),
    ("threshold", 0.0, [[3, 4]], True),  # a prompt shorter than a block: no prefill pass
    ("confidence", 0.0, [[3, 4, 5, 6, 7, 8, 9, 10, 11]], True),  # a prompt ending mid-block
    ("confidence", 0.0, PROMPTS, False),  # BD3LM's convention: slot i from query i
    ("random", 0.9, [[3, 4, 5, 6, 7, 8, 9, 10, 11]], False),
])
def test_the_static_cache_passes_give_the_dynamic_cache_tokens(strategy, temperature, prefixes, shift):
    net = block_net(shift=shift)
    eager = decode(net, prefixes, strategy=strategy, temperature=temperature)
    static = decode(net, prefixes, strategy=strategy, temperature=temperature, graphs="none")
    assert torch.equal(static.ids, eager.ids)
    assert static.stats.forward_passes == eager.stats.forward_passes
    assert (static.ids[:, -12:] != net.mask_token_id).all()  # every slot decided


def test_the_traced_passes_give_the_eager_tokens():
    net = block_net()
    eager = decode(net, strategy="random", temperature=0.9)
    traced = decode(net, strategy="random", temperature=0.9, graphs="eager")  # dynamo capture, no codegen
    assert torch.equal(traced.ids, eager.ids)


@pytest.mark.skipif(not cpu_compiler(), reason="inductor needs a C++ compiler on the CPU")
def test_the_compiled_decoder_gives_the_eager_tokens_on_the_cpu():
    net = block_net()
    for strategy, temperature in (("confidence", 0.0), ("random", 0.9)):
        eager = decode(net, strategy=strategy, temperature=temperature)
        compiled = decode(net, strategy=strategy, temperature=temperature, graphs=True)
        assert torch.equal(compiled.ids, eager.ids), strategy


@pytest.mark.parametrize("kw, message", [
    (dict(prefixes=[[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]), r"these rows decode 3 to 4 blocks .* decode them one at a time"),
    (dict(stop_at_eos=True, eos_id=0), r"max_length \(stop at EOS\) drops finished rows: give length instead"),
    (dict(sub_block=2), "sub-blocks change the shape from step to step"),
    (dict(kv_cache=False), "drop kv_cache=False"),
])
def test_dynamic_shapes_under_graphs_are_one_line(kw, message):
    with pytest.raises(DLMError, match=r"^graphs=True .*" + message):
        decode(block_net(), graphs=True, **kw)
