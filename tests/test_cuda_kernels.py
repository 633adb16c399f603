"""CUDA checks of issue 23 (``pytest -m cuda``; the GPU suite's tests part runs this file): fused
AdamW, Liger's fused kernels against the plain path (loss and every gradient), CUDA-graph block
decoding against the eager decoder, token for token. Imports stay light (no datasets): the GPU
machine runs this file with what it has."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lightning_dlm.core import get_schedule
from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig
from lightning_dlm.sampling.block_decode import block_decode
from lightning_dlm.sampling.engine import SamplerConfig
from lightning_dlm.training.optim import OptimConfig, build_optimizer

pytestmark = pytest.mark.cuda

MODEL = dict(model_type="llama", vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def needs(*packages):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for name in packages:
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"needs {name}")


def test_fused_adamw_on_cuda():
    needs()
    optimizer, _ = build_optimizer(torch.nn.Linear(2, 2).cuda(), OptimConfig(lr_schedule="constant"), None)
    assert optimizer.defaults["fused"] is True


def objective_loss_and_grads(net, objective, ids, step):
    from lightning_dlm.objectives import build_objective

    impl = build_objective(objective, DiffusionConfig(anneal_steps=4).check(), 0, 2)
    out = impl.train_terms(net, {"input_ids": ids}, step=step, counter=step, rank=0)
    loss = out.terms.normalized("elbo")
    net.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def twin_models():
    """Two copies of the tiny model on CUDA in training mode, with the same weights."""
    cfg = BackboneConfig(config=dict(MODEL), mask_token=MaskTokenConfig(mode="reuse", id=4095))
    torch.manual_seed(0)
    reference = DiffusionModel.from_config(cfg, None).cuda().train()
    other = DiffusionModel.from_config(cfg, None).cuda().train()
    other.load_state_dict(reference.state_dict())
    return reference, other


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_liger_kernels_match_the_plain_path(objective, exact_fp32):
    needs("liger_kernel")
    from lightning_dlm.model.fused_kernels import apply_liger

    plain, fused = twin_models()
    counts = apply_liger(fused, torch.device("cuda"))
    assert counts == {"rms_norm": 2 * 2 + 1, "swiglu": 2}
    assert fused.fused_row_ce is not None and list(fused.state_dict()) == list(plain.state_dict())
    ids = torch.randint(1, 4000, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for step in (0, 5):  # annealing (dense mask), bidirectional
        loss_p, grads_p = objective_loss_and_grads(plain, objective, ids, step)
        loss_f, grads_f = objective_loss_and_grads(fused, objective, ids, step)
        torch.testing.assert_close(loss_f, loss_p, rtol=1e-4, atol=1e-5)
        assert grads_f.keys() == grads_p.keys()
        for name in grads_p:
            torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-3, atol=1e-5, msg=name)


def test_compiled_layers_on_cuda_match_eager(exact_fp32):
    needs("triton")
    from lightning_dlm.model.compiled import compile_decoder_layers

    eager, compiled = twin_models()
    assert compile_decoder_layers(compiled.model, torch.device("cuda")) == 2
    ids = torch.randint(1, 4000, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for step in (0, 5):
        loss_e, grads_e = objective_loss_and_grads(eager, "diffusion", ids, step)
        loss_c, grads_c = objective_loss_and_grads(compiled, "diffusion", ids, step)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=name)


def test_cuda_graphs_give_the_eager_tokens_and_replay(exact_fp32):
    needs("triton")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      attn_implementation="sdpa")).eval()
    net = DiffusionModel(hf, 96, False, attn_implementation="sdpa",
                         diffusion=DiffusionConfig(attention="block", block_size=8).check()).cuda()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]
    for strategy, temperature in (("confidence", 0.0), ("random", 0.9)):
        config = SamplerConfig(steps=4, temperature=temperature, strategy=strategy)

        def run(**kw):
            return block_decode(net, prompts, 32, config, block_size=8, schedule=get_schedule("linear"), seeds=[1, 2],
                                **kw)

        eager = run()
        graphs, again = run(graphs=True), run(graphs=True)  # captured, then replayed
        assert torch.equal(graphs.ids, eager.ids) and torch.equal(again.ids, eager.ids), strategy
