"""CUDA checks of block diffusion (``pytest -m cuda``; skipped without a GPU).

On a GPU, transformers runs FlexAttention compiled (Triton kernels); the block mode's 2L layout
then goes through :func:`~lightning_dlm.core.blocks.block_mask_mod` as a BlockMask instead of
the dense three-part additive mask that sdpa gets. These tests run one block-mode loss on both
paths with the same weights and the same noise (two rows, one left-padded; length 256, so the 2L
pass is 512 positions: four 128-blocks of the BlockMask per side) and compare, in fp32 with TF32
off, the loss and every weight gradient. ``benchmarks/gpu_suite.py`` runs them in its first part.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_dlm.core import get_schedule
from lightning_dlm.core.blocks import block_times
from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.model import DiffusionModel
from lightning_dlm.objectives.block import block_loss_terms

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.usefixtures("exact_fp32"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_suite.py)"),
]

LENGTH, VOCAB = 256, 97
CUDA_LLAMA = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def block_pair(block_size: int, device: str):
    """The same tiny LLaMA as a block model on sdpa (dense mask) and on flex_attention."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**CUDA_LLAMA, attn_implementation="sdpa")).to(device).train()
    flex_hf = LlamaForCausalLM(LlamaConfig(**CUDA_LLAMA, attn_implementation="flex_attention")).to(device).train()
    flex_hf.load_state_dict(copy.deepcopy(hf.state_dict()))
    diffusion = DiffusionConfig(attention="block", block_size=block_size).check()
    return (DiffusionModel(hf, VOCAB - 1, False, diffusion=diffusion, attn_implementation="sdpa"),
            DiffusionModel(flex_hf, VOCAB - 1, False, diffusion=diffusion, attn_implementation="flex_attention"))


def block_loss(net, block_size: int, device: str, backward: bool = True):
    """The block-mode loss of a fixed batch (row 1 left-padded by 40) and its weight gradients."""
    x0 = torch.randint(0, VOCAB - 1, (2, LENGTH), generator=torch.Generator().manual_seed(1)).to(device)
    pad = torch.ones_like(x0)
    pad[1, :40] = 0
    g = torch.Generator().manual_seed(2)
    t_pos = block_times(2, LENGTH, block_size, True, lambda n: 0.05 + 0.9 * torch.rand(n, generator=g)).to(device)
    terms, masked, _ = block_loss_terms(net, x0, t_pos, get_schedule("linear"), block_size, True,
                                        torch.Generator(device=device).manual_seed(3), attention_mask=pad)
    loss = terms.normalized("elbo")
    grads = {}
    if backward:
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in net.model.named_parameters() if p.grad is not None}
    return loss.detach(), masked, grads


@pytest.mark.parametrize("block_size", [4, 32, 128])
def test_block_mode_on_flex_attention_equals_the_dense_mask_forward_and_backward(block_size):
    dense_net, flex_net = block_pair(block_size, "cuda")
    dense, masked_d, grads_d = block_loss(dense_net, block_size, "cuda")
    flex, masked_f, grads_f = block_loss(flex_net, block_size, "cuda")
    assert torch.equal(masked_d, masked_f) and masked_d.any()
    assert torch.allclose(dense, flex, rtol=1e-5, atol=1e-5), (dense.item(), flex.item())
    assert grads_d.keys() == grads_f.keys() and len(grads_d) > 0
    for name, grad in grads_d.items():
        assert torch.allclose(grad, grads_f[name], rtol=1e-4, atol=1e-5), name
